"""A fuzz case through the CLI, with multi-sample calibration data, and a run of what it wrote.

`check_case_cli(case, plan_seed, folder)` writes the case's model and runs, in this process
(`aofp_onnx.cli.main`: exit codes and stderr as a user sees them):
1. `aofp-onnx prune MODEL --criterion l1 --flops-target F --calib random:8 --batch-size 4 --input-shape ...`
   (calibration and verification on batches of several samples; no latency timing: a test, not a benchmark);
2. `aofp-onnx apply MODEL --plan PLAN --calib random:8 ...` with a plan drawn the way `check_case` draws
   them (every prunable group keeps a random non-empty subset), on the analysis the CLI makes (`Pruner.load`).
Failures, by kind:
cli (exit != 0, with its first stderr line), nonequivalent (the report's verification failed), runtime (the
written model does not run on `case.batch` samples, or its outputs' shapes/dtypes differ from the original's),
declarations (the written model's inputs are not declared as the original's), error (the plan could not be made).
"""
from __future__ import annotations

import contextlib
import io
import json
import pathlib
import traceback

import numpy as np
import onnx

import fuzzgraphs as fg

CALIB = "random:8"


def run_main(argv: list[str]) -> tuple[int, str]:
    """`aofp-onnx ARGV` in this process: (exit code, stderr)."""
    from aofp_onnx.cli import main

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


def _declared(model: onnx.ModelProto) -> list:
    inits = {t.name for t in model.graph.initializer}
    return [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in model.graph.input if v.name not in inits]


def _outputs(path: pathlib.Path, feeds: dict) -> list[tuple[tuple, str]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outs = sess.run(None, feeds)
    if not all(np.isfinite(o.astype(np.float32)).all() for o in outs):
        raise ValueError("non-finite output")
    return [(o.shape, o.dtype.str) for o in outs]


def check_case_cli(case: fg.Case, plan_seed: int, folder: pathlib.Path) -> list[tuple[str, str]]:
    """The failures (kind, message) of `case` cut by one random plan through the CLI; empty: it passed."""
    from aofp_onnx.api import Pruner
    from aofp_onnx.plan import plan_from_keep

    model_path, plan_path = folder / "model.onnx", folder / "plan.json"
    out_path, rep_path = folder / "pruned.onnx", folder / "report.json"
    onnx.save(case.model, model_path)
    shape = f"{fg.INPUT}:{','.join(map(str, case.input_shape))}"
    target = f"{np.random.default_rng(plan_seed).uniform(0.3, 0.9):.2f}"
    failures = _cli(["prune", str(model_path), "-o", str(out_path), "--criterion", "l1", "--flops-target", target,
                     "--calib", CALIB, "--batch-size", "4", "--input-shape", shape, "--report", str(rep_path),
                     "--no-progress", "--no-latency"], case, model_path, out_path, rep_path, f"prune l1 @ {target}")
    if failures:
        return failures
    try:
        pruner = Pruner.load(model_path, input_shapes={fg.INPUT: tuple(case.input_shape)})
        keep = fg.random_keep(pruner.cmap, plan_seed)
        plan_from_keep(pruner.cmap, keep, "random", seed=plan_seed, flops_target=None).save(plan_path)
    except Exception:
        return [("error", "plan: " + traceback.format_exc(limit=4))]
    return _cli(["apply", str(model_path), "--plan", str(plan_path), "-o", str(out_path), "--calib", CALIB,
                 "--input-shape", shape, "--report", str(rep_path)], case, model_path, out_path, rep_path, "apply")


def _cli(argv, case, model_path, out_path, rep_path, what) -> list[tuple[str, str]]:
    for p in (out_path, rep_path):
        p.unlink(missing_ok=True)
    code, err = run_main(argv)
    if code != 0:
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
        return [("cli", f"{what}: exit {code}: {(lines or ['no stderr'])[0][:300]}")]
    rep = json.loads(rep_path.read_text())
    if not rep["verification"]["passed"]:
        return [("nonequivalent", f"{what}: verification {rep['verification']}")]
    feeds = fg.feeds_for((case.batch, *case.input_shape[1:]), n_batches=1, dtype=fg.input_dtype(case.model))[0]
    try:
        expected, got = _outputs(model_path, feeds), _outputs(out_path, feeds)
    except Exception as exc:
        return [("runtime", f"{what}: written model on {case.batch} sample(s): {str(exc).splitlines()[0][:300]}")]
    if got != expected:
        return [("runtime", f"{what}: written model's outputs {got}, the original's {expected}")]
    written = onnx.load(str(out_path), load_external_data=False)
    if _declared(written) != _declared(case.model):
        return [("declarations", f"{what}: inputs declared {_declared(written)}, originally {_declared(case.model)}")]
    return []
