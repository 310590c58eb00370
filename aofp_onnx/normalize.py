"""Normalize a loaded model the way the analysis reads it: old opsets upgraded, constant subgraphs folded.

Both use the libraries' own tools: `onnx.version_converter` upgrades opsets below MIN_OPSET, and
onnx-graphsurgeon's `fold_constants` (onnxruntime underneath) computes the values of constant
subgraphs; those values are transplanted into the file's own proto, so whatever is not folded keeps
its node names, order, attributes and the model its metadata.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from .errors import InputError
from .modeldata import default_opset

MIN_OPSET = 11  # the oldest opset the analysis reads; older ones are upgraded to it


def upgrade_opset(model: onnx.ModelProto, label: str = "model", notes: list[str] | None = None) -> onnx.ModelProto:
    """`model` converted to MIN_OPSET by onnx.version_converter when its opset is older (refused when
    the converter fails or its result fails onnx.checker)."""
    opset = default_opset(model)
    if opset >= MIN_OPSET:
        return model
    try:
        upgraded = version_converter.convert_version(model, MIN_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise InputError(f"{label}: opset {opset} cannot be upgraded to {MIN_OPSET} by onnx.version_converter "
                         f"({reason})") from None
    if notes is not None:
        notes.append(f"opset {opset} upgraded to {MIN_OPSET}")
    return upgraded


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every node computed from constants alone by initializers of its outputs, in place.

    Requires: a topologically sorted graph. Ensures: a node whose inputs are all initializers or outputs
    of such nodes (Constant, Reshape/Cast/Transpose/Unsqueeze/Concat/arithmetic of constants, Shape of a
    constant, ...) is gone and its outputs consumed elsewhere are initializers of the same names; nothing
    that depends on a model input is folded (no shape folding), nor a node that writes a graph output,
    reads a random generator, or would grow the model (an output larger than `FOLD_GROWTH` elements and
    than its inputs together: Expand, Tile, ConstantOfShape; a Constant's value is in the file already).
    Initializers only the folded nodes read go. Every other node keeps its name, order and attributes;
    the model keeps its metadata and value_info.

    The values come from onnx-graphsurgeon's `fold_constants` (it evaluates the constant subgraphs with
    onnxruntime) run on a copy: its exported model is not used, because a graphsurgeon round trip
    re-creates the model (metadata_props and value_info dropped); only the values are taken over.
    """
    values = _folded_values(model)
    graph = model.graph
    outputs = {o.name for o in graph.output}
    sizes = {init.name: int(np.prod(init.dims)) for init in graph.initializer}
    const = set(sizes)
    folded_nodes, new_inits = set(), {}
    for k, node in enumerate(graph.node):
        outs = [o for o in node.output if o]
        if (not outs or node.op_type in RANDOM_OPS or any(o in outputs or o not in values for o in outs)
                or any(i and i not in const for i in node.input)):
            continue
        tensors = [_as_initializer(values[o], o) for o in outs]
        grown = max(int(np.prod(t.dims)) for t in tensors if t is not None) if all(tensors) else None
        if grown is None or node.op_type != "Constant" and grown > max(FOLD_GROWTH, sum(sizes.get(i, 0)
                                                                                  for i in node.input if i)):
            continue
        folded_nodes.add(k)
        for t in tensors:
            new_inits[t.name] = t
            sizes[t.name] = int(np.prod(t.dims))
            const.add(t.name)
    if not folded_nodes:
        return model
    kept = [n for k, n in enumerate(graph.node) if k not in folded_nodes]
    read = {i for n in kept for i in [*n.input, *subgraph_reads(n)] if i} | outputs
    before = {i for k, n in enumerate(graph.node) if k in folded_nodes for i in n.input if i}
    declared = {i.name for i in graph.input}
    inits = [i for i in graph.initializer if i.name in read or i.name not in before or i.name in declared]
    inits += [t for name, t in new_inits.items() if name in read]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return model


RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
FOLD_GROWTH = 1 << 16  # a folded output may exceed its inputs' total size up to this many elements


def _folded_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Values of the node outputs onnx-graphsurgeon folds to constants in a copy of `model` (quietly)."""
    import onnx_graphsurgeon as gs

    logger = gs.logger.G_LOGGER
    severity = logger.severity
    logger.severity = logger.CRITICAL + 10  # its per-node "could not fold" notes are not for the user
    # onnxruntime's own log stays at runtime.QUIET (set when `runtime` is imported, as `graph` does)
    ir_version = model.ir_version  # stamped by an onnx newer than onnxruntime: the opsets' own IR will do
    model.ir_version = min(ir_version, onnx.helper.find_min_ir_version_for(list(model.opset_import), True))
    try:
        for partitioning in (None, "basic"):  # one onnxruntime run; per partition when that run fails
            graph = gs.import_onnx(model)
            graph.fold_constants(fold_shapes=False, recurse_subgraphs=False, flatten_subgraphs=False,
                                 partitioning=partitioning, should_exclude_node=lambda n: n.op in RANDOM_OPS)
            tensors = graph.tensors()
            const = {name for name, t in tensors.items() if isinstance(t, gs.Constant)}
            left = [n for n in graph.nodes if n.op not in RANDOM_OPS and n.outputs
                    and all(t.name in const for t in n.inputs) and any(t.name not in const for t in n.outputs)]
            if not left:
                break
        computed = const - {i.name for i in model.graph.initializer}  # not the weights: no copies
        return {name: tensors[name].values for name in computed}
    except Exception:  # graphsurgeon could not read or fold the model: nothing is folded
        return {}
    finally:
        model.ir_version = ir_version
        logger.severity = severity


def _as_initializer(value, name: str) -> onnx.TensorProto | None:
    """`value` as an initializer named `name`; None for what numpy_helper cannot write."""
    try:
        return numpy_helper.from_array(np.asarray(value), name)
    except Exception:
        return None


def subgraph_reads(node: onnx.NodeProto) -> list[str]:
    """Names read inside `node`'s subgraphs (If/Loop/Scan bodies, recursively): outer-scope values among them."""
    names: list[str] = []
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for n in g.node:
                names.extend(i for i in n.input if i)
                names.extend(subgraph_reads(n))
            names.extend(o.name for o in g.output)  # a body may return an outer value as is
    return names
