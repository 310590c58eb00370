"""The core invariant, checked on data: the pruned model equals the masked original.

Compared: every graph output on every batch, and the output of every MAC-counted node (Conv,
ConvTranspose, Gemm, MatMul) restricted to its kept channels — so a cut is proven layer by layer even
where the model's outputs saturate (a sigmoid map that is ~0 on the data says little). With k batches,
batch i checks layers i, i+k, i+2k, …: every layer is checked, and only 1/k of them is held at once. For
each compared tensor, d = max|y_masked − y_pruned| and s = max|y_masked|; the cut passes when
d ≤ tol · max(s, 1) for every one (tol = 1e-4 by default), shapes agree and all values are finite. A
float16 model is compared in float32: both models are widened alike (float16 initializers, Casts, inputs
and outputs become float32), so the check sees the cut itself, not float16 rounding — which, compounded
over a deep network's layers, flips saturated outputs between two float16 runs that differ only in
summation order. The pruned model must also pass `onnx.checker` (full check) and build an onnxruntime
session.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .modeldata import ModelData, as_model_data, is_placeholder, placeholder
from .groups import ChannelMap
from .masking import KEEP_INPUT, keep_feed, masked_model
from .runtime import Runner

DEFAULT_TOL = 1e-4
FLOAT16 = onnx.TensorProto.FLOAT16


@dataclass
class Verification:
    max_abs_diff: float
    max_rel_diff: float
    passed: bool
    provider: str
    samples: int
    detail: str = ""

    def to_json(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "max_rel_diff": self.max_rel_diff, "passed": self.passed,
                "provider": self.provider, "samples": self.samples, **({"detail": self.detail} if self.detail else {})}


def check_pruned(model: onnx.ModelProto | str) -> str:
    """'' when `model` (a proto or a file path) passes onnx.checker (full check), else the checker's first line."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        return str(exc).strip().splitlines()[0][:300]
    return ""


def verify(cmap: ChannelMap, keep: np.ndarray, pruned: onnx.ModelProto | ModelData,
           batches: list[dict[str, np.ndarray]], provider: str = "auto", tol: float = DEFAULT_TOL,
           checker: bool = True) -> Verification:
    """Compare the masked original and the pruned model on `batches` of feeds.

    `checker=False` leaves onnx.checker to the caller (`api.save_model` runs it on the written file)."""
    pruned = as_model_data(pruned)
    problem = check_pruned(pruned.materialize()) if checker else ""
    reference_model = masked_model(cmap)
    if FLOAT16 in cmap.graph.dtypes.values():
        reference_model, pruned = widen(reference_model), widen(pruned)
        batches = [{k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in b.items()} for b in batches]
    layers = _layer_outputs(cmap)
    outputs = [o.name for o in pruned.proto.graph.output]
    # unoptimized sessions without prepacking read our weight arrays in place (see Runner); no arena:
    # each run's activations are returned at once
    reference = Runner(_with_outputs(reference_model, layers), provider, optimization="disable", prepack=False,
                       arena=False)
    if problem:
        return Verification(float("inf"), float("inf"), False, reference.provider, 0, f"onnx.checker: {problem}")
    candidate = Runner(_with_outputs(pruned, layers), provider, optimization="disable", prepack=False,
                       arena=False)
    mask = keep_feed(keep)
    worst_abs = worst_rel = 0.0
    samples = 0
    detail = ""
    for k, feeds in enumerate(batches):
        names = outputs + layers[k::len(batches)]
        ref = reference.run({**feeds, KEEP_INPUT: mask}, names)
        got = candidate.run(feeds, names)
        samples += len(next(iter(feeds.values())))
        for name, a, b in zip(names, ref, got):
            if name in cmap.tensor_axis and name not in cmap.graph.outputs:
                a = np.take(a, cmap.kept_indices(name, keep), axis=cmap.tensor_axis[name])
            if a.shape != b.shape:
                return Verification(float("inf"), float("inf"), False, reference.provider, samples,
                                    f"output '{name}': shape {b.shape}, expected {a.shape}")
            if not np.all(np.isfinite(b)):
                return Verification(float("inf"), float("inf"), False, reference.provider, samples,
                                    f"output '{name}': non-finite values")
            diff = float(np.max(np.abs(a - b))) if a.size else 0.0
            rel = diff / max(float(np.max(np.abs(a))) if a.size else 0.0, 1.0)
            if rel > worst_rel:
                detail = f"worst output '{name}'"
            worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, rel)
    return Verification(worst_abs, worst_rel, worst_rel <= tol, reference.provider, samples, detail)


def widen(model: ModelData) -> ModelData:
    """`model` computing in float32 where it computes in float16: initializers, Cast targets, tensor
    attributes, graph inputs and outputs (value_info dropped: onnxruntime infers the types again)."""
    proto = model.copy_proto()
    weights = dict(model.weights)
    g = proto.graph
    for k, init in enumerate(g.initializer):
        if init.data_type != FLOAT16:
            continue
        if is_placeholder(init):
            weights[init.name] = weights[init.name].astype(np.float32)
            g.initializer[k].CopyFrom(placeholder(init.name, weights[init.name]))
        else:
            g.initializer[k].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32),
                                                              init.name))
    for node in g.node:
        for a in node.attribute:
            if a.name == "to" and a.i == FLOAT16:
                a.i = onnx.TensorProto.FLOAT
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == FLOAT16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
    for vi in [*g.input, *g.output]:
        if vi.type.tensor_type.elem_type == FLOAT16:
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    del g.value_info[:]
    return ModelData(proto, weights)


def _layer_outputs(cmap: ChannelMap) -> list[str]:
    """Outputs of the MAC-counted nodes that carry channels (compared on their kept channels)."""
    outs = []
    for c in cmap.counted:
        name = cmap.graph.nodes[c.node_index].output[0]
        if name in cmap.tensor_axis and name not in cmap.graph.outputs:
            outs.append(name)
    return outs


def _with_outputs(model: ModelData, names: list[str]) -> ModelData:
    """`model` with tensors `names` also exposed as graph outputs (untyped: onnxruntime infers them)."""
    out = model.copy_proto()
    have = {o.name for o in out.graph.output}
    out.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    return ModelData(out, model.weights)
