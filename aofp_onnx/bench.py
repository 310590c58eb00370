"""`bench`: latency of one or more models side by side on one provider, at one or more batches and shapes.

Each configuration (a batch size × a choice of input shapes) feeds every model seeded normal inputs at
its fixed dims (a dynamic batch = the batch size, other dynamic dims from --input-shape; a name given
several shapes makes several configurations); the models' runs are interleaved round-robin so machine
noise hits them alike, and the median (with p10/p90) of `repeats` timed runs is reported with its ratio
to the first model's median in the same configuration. A batch the file pins takes the batch size in
samples, in runs of its size (see `runtime.Runner`).
"""
from __future__ import annotations

import itertools
import os

import numpy as np
import onnx

from .calib import input_specs
from .errors import InputError
from .graph import fixed_input_shapes, load_model
from .runtime import Runner, latency_ms, pinned_batches


def model_feeds(model: onnx.ModelProto, batch_size: int | None, input_shapes: dict | None = None,
                seed: int = 0, follow: bool = False) -> dict:
    """Seeded normal inputs; `batch_size` (None: the --input-shape's, else 1) fills a dynamic batch dim.
    A single batch size must agree with the first dim of an --input-shape (`follow`: several batch sizes,
    each replaces that dim)."""
    for name, shape in (input_shapes or {}).items():
        if batch_size is not None and not follow and shape and shape[0] != batch_size:
            raise InputError(f"--batch-size {batch_size} and --input-shape {name}:{','.join(map(str, shape))} "
                             "disagree on the batch; give one of them")
    specs = {s.name: s for s in input_specs(model)}
    given = {}
    for name, shape in (input_shapes or {}).items():
        shape = tuple(shape)
        spec = specs.get(name)
        if (batch_size and spec is not None and spec.shape
                and not (isinstance(spec.shape[0], int) and spec.shape[0] > 0)):
            shape = (batch_size,) + shape[1:]  # a dynamic batch follows --batch-size
        given[name] = shape
    for spec in specs.values():
        if spec.name not in given and spec.shape and not (isinstance(spec.shape[0], int) and spec.shape[0] > 0):
            dims = list(spec.shape)
            dims[0] = batch_size or 1
            if all(isinstance(d, int) and d > 0 for d in dims):
                given[spec.name] = tuple(dims)
    shapes = fixed_input_shapes(model, given)
    for name, b in pinned_batches(model).items():  # a pinned batch takes batch_size samples in runs of b
        if name not in given and batch_size:
            shapes[name] = (batch_size, *shapes[name][1:])
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(specs[name].dtype) for name, shape in shapes.items()}


def shape_settings(shapes: list[tuple[str, tuple]] | dict | None) -> list[dict]:
    """[(name, dims), ...] → every combination of the shapes given per name ({} when none)."""
    if not shapes:
        return [{}]
    pairs = list(shapes.items()) if isinstance(shapes, dict) else list(shapes)
    per_name: dict[str, list[tuple]] = {}
    for name, dims in pairs:
        per_name.setdefault(name, []).append(tuple(dims))
    names = list(per_name)
    return [dict(zip(names, combo)) for combo in itertools.product(*(per_name[n] for n in names))]


def bench_models(paths: list[str], *, provider: str = "auto", batch_size: int | list[int] | None = None,
                 repeats: int = 50, warmup: int = 5, threads: int | None = None, input_shapes=None) -> list[dict]:
    """One row per model and configuration: median/p10/p90 ms and the ratio to the first model.
    `batch_size` None: the batch the input shapes give (else 1)."""
    batches = [batch_size] if batch_size is None or isinstance(batch_size, int) else list(batch_size)
    if not paths or any(b is not None and b < 1 for b in batches):
        raise InputError("bench needs at least one model and batch sizes of at least 1")
    models = [load_model(p) for p in paths]
    runners = [Runner(m, provider, threads=threads, exact=False, spin=True) for m in models]
    rows = []
    for batch, shapes in itertools.product(batches, shape_settings(input_shapes)):
        feeds = [model_feeds(m, batch, shapes, follow=len(batches) > 1) for m in models]
        stats = latency_ms(runners, feeds, warmup=warmup, repeats=repeats)
        base = stats[0]["median"]
        for p, r, f, s in zip(paths, runners, feeds, stats):
            rows.append({"model": p, "provider": r.provider, "threads": threads or "default",
                         "batch_size": int(len(next(iter(f.values())))) if f else batch,
                         "input_shapes": {k: list(v.shape) for k, v in f.items()}, "median_ms": s["median"],
                         "p10_ms": s["p10"], "p90_ms": s["p90"], "repeats": s["repeats"],
                         "ratio": s["median"] / base if base > 0 else float("nan")})
    return rows


def bench_table(rows: list[dict], per: int, repeats: int) -> list[str]:
    """`aofp-onnx bench`'s table: `per` models a configuration, a heading per configuration when several."""
    lines = [f"{'model':<40} {'median ms':>10} {'p10':>8} {'p90':>8} {'ratio':>7}   "
             + (f"(batch {rows[0]['batch_size']}, " if len(rows) == per else "(")
             + f"{rows[0]['provider']}, threads {rows[0]['threads']}, medians of {repeats} interleaved runs)"]
    for start in range(0, len(rows), per):
        first = rows[start]
        if len(rows) > per:  # several batch sizes or shapes
            shapes_text = " ".join(f"{k}:{','.join(map(str, v))}" for k, v in first["input_shapes"].items())
            lines.append(f"-- batch {first['batch_size']}  {shapes_text}")
        lines += [f"{os.path.basename(r['model']):<40} {r['median_ms']:>10.3f} {r['p10_ms']:>8.3f} "
                  f"{r['p90_ms']:>8.3f} {r['ratio']:>7.3f}" for r in rows[start:start + per]]
    return lines
