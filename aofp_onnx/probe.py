"""One probe run at the analysis shapes, before any search: a shape the model cannot run is refused.

Shape inference accepts shapes a model cannot run (PP-OCR det at 100×100: its FPN adds maps that
need H, W multiples of 32). The probe runs the working model once on seeded noise at the analysis
shapes; when onnxruntime fails, the error names the input and shape, and the constraint where it can
be found: the smallest m in 2, 4, …, 128 such that rounding the input's dynamic dims past the batch
up to multiples of m runs (m is then what the model needs; the rounded shape is offered).
"""
from __future__ import annotations

import numpy as np
import onnx

from .errors import InputError
from .modeldata import ModelData
from .runtime import Runner, pinned_batches

MULTIPLES = (2, 4, 8, 16, 32, 64, 128)


def probe(data: ModelData, shapes: dict[str, tuple[int, ...]], dynamic: dict[str, list[int]]) -> dict[str, int]:
    """Run `data` once at `shapes`; InputError naming the input (and constraint) when it cannot.
    Returns the inputs whose batch the file declares dynamic but the graph pins (see `_graph_pinned`).

    `dynamic`: per input, the axes past the batch that the file leaves open (those the user chose)."""
    feeds = _noise(data.proto, shapes)
    runner = None
    try:
        runner = Runner(data, "cpu", optimization="disable", prepack=False, arena=False)
        runner.run(feeds)
        return _graph_pinned(runner, data.proto, shapes)
    except InputError:
        raise
    except Exception as exc:
        error = _first_line(exc)
    for name, axes in dynamic.items():
        if not axes or runner is None:
            continue
        for m in MULTIPLES:
            rounded = list(shapes[name])
            for a in axes:
                rounded[a] = -(-rounded[a] // m) * m
            if tuple(rounded) == tuple(shapes[name]):
                continue
            try:
                runner.run({**feeds, **_noise(data.proto, {name: tuple(rounded)})})
            except Exception:
                continue
            dims = ", ".join(f"dim {a}" for a in axes)
            raise InputError(f"input '{name}' at shape {_fmt(shapes[name])}: the model cannot run it; it needs "
                             f"{dims} multiples of {m} (e.g. --input-shape {name}:{','.join(map(str, rounded))})")
    names = ", ".join(f"'{n}' at shape {_fmt(s)}" for n, s in shapes.items())
    raise InputError(f"input {names}: the model cannot run it (onnxruntime: {error})")


def _graph_pinned(runner: Runner, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """{input: b} for the inputs declared with a dynamic batch that run at their analysis batch b but
    not at 2·b: the graph pins the batch itself (a `Reshape(x, [1, -1])` or Resize sizes [1, ..] under a
    `dim_param`). One run at 2·b; {} when it runs (or no input's batch is declared dynamic)."""
    fixed = pinned_batches(model)
    loose = [name for name, shape in shapes.items() if name not in fixed and shape]
    if not loose:
        return {}
    doubled = {n: ((2 * s[0],) + tuple(s[1:]) if n in loose else s) for n, s in shapes.items()}
    try:
        runner.run(_noise(model, doubled))
    except Exception:  # the batch is pinned inside the graph: it runs at b only
        return {name: int(shapes[name][0]) for name in loose}
    return {}


def open_axes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Per graph input, the axes past the batch whose size the file leaves open."""
    inits = {i.name for i in model.graph.initializer}
    return {vi.name: [a for a, d in enumerate(vi.type.tensor_type.shape.dim)
                      if a > 0 and not (d.HasField("dim_value") and d.dim_value > 0)]
            for vi in model.graph.input if vi.name not in inits}


def _noise(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input}
    out = {}
    for name, shape in shapes.items():
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(types[name]))
        out[name] = rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)
    return out


def _fmt(shape) -> str:
    return "x".join(map(str, shape))


def _first_line(exc: Exception) -> str:
    """onnxruntime's message without its source location: 'Non-zero status … Add node. Name:… <reason>'."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "Status Message:" in text:
        head, _, reason = text.partition("Status Message:")
        node = head.split("while running", 1)[-1].strip().rstrip(".")
        reason = reason.split(" was false. ", 1)[-1] if " was false. " in reason else reason
        text = f"{node}: {reason.strip()}"
    return text[:300]
