"""`bench`: latency of one or more models side by side on one provider.

Each model gets seeded normal inputs at its fixed dims (dynamic batch = --batch-size, other dynamic
dims from --input-shape); the runs are interleaved round-robin so machine noise hits all models alike,
and the median (with p10/p90) of `repeats` timed runs is reported.
"""
from __future__ import annotations

import numpy as np
import onnx

from .calib import input_specs
from .errors import InputError
from .graph import fixed_input_shapes, load_model
from .runtime import Runner, latency_ms


def model_feeds(model: onnx.ModelProto, batch_size: int | None, input_shapes: dict | None = None,
                seed: int = 0) -> dict:
    """Seeded normal inputs; `batch_size` (None: 1) fills a dynamic batch dim and must agree with the first
    dim of an --input-shape."""
    given = {k: tuple(v) for k, v in (input_shapes or {}).items()}
    for name, shape in given.items():
        if batch_size is not None and shape and shape[0] != batch_size:
            raise InputError(f"--batch-size {batch_size} and --input-shape {name}:{','.join(map(str, shape))} "
                             "disagree on the batch; give one of them")
    batch_size = batch_size or 1
    specs = {s.name: s for s in input_specs(model)}
    for spec in specs.values():
        if spec.name not in given and spec.shape and not (isinstance(spec.shape[0], int) and spec.shape[0] > 0):
            dims = list(spec.shape)
            dims[0] = batch_size
            if all(isinstance(d, int) and d > 0 for d in dims):
                given[spec.name] = tuple(dims)
    shapes = fixed_input_shapes(model, given)
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(specs[name].dtype) for name, shape in shapes.items()}


def bench_models(paths: list[str], *, provider: str = "auto", batch_size: int | None = None, repeats: int = 50,
                 warmup: int = 5, threads: int | None = None, input_shapes: dict | None = None) -> list[dict]:
    models = [load_model(p) for p in paths]
    runners = [Runner(m, provider, threads=threads) for m in models]
    feeds = [model_feeds(m, batch_size, input_shapes) for m in models]
    stats = latency_ms(runners, feeds, warmup=warmup, repeats=repeats)
    return [{"model": p, "provider": r.provider, "batch_size": int(next(iter(f.values())).shape[0]) if f else 1,
             "median_ms": s["median"], "p10_ms": s["p10"], "p90_ms": s["p90"], "repeats": s["repeats"]}
            for p, r, s, f in zip(paths, runners, stats, feeds)]
