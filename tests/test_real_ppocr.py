"""PP-OCRv4 text detection (a real Paddle2ONNX export, opset 12) through the CLI.

Input `x` is [?, 3, ?, ?] with H, W multiples of 32. The model is analysed at a fixed shape but the
pruned model must keep its dynamic dims: it is run, and verified against the masked original, at
other sizes than the one it was pruned at.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cliutil import run_cli

pytestmark = pytest.mark.slow

TARGET = 0.7


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def pruned(ppocr_det, tmp_path_factory):
    d = tmp_path_factory.mktemp("ppocr")
    out = {"onnx": d / "det_pruned.onnx", "report": d / "report.json", "plan": d / "plan.json"}
    proc = ok(run_cli("prune", ppocr_det, "-o", out["onnx"], "--criterion", "l1", "--flops-target", TARGET,
                      "--calib", "random:4", "--batch-size", "2", "--input-shape", "x:1,3,320,320",
                      "--report", out["report"], "--plan-out", out["plan"], "--no-progress"))
    out["stdout"] = proc.stdout
    out["rep"] = json.loads(out["report"].read_text())
    return out


def test_inspect_prunable_share(ppocr_det, tmp_path):
    ok(run_cli("inspect", ppocr_det, "--input-shape", "x:1,3,640,640", "--json", tmp_path / "info.json"))
    info = json.loads((tmp_path / "info.json").read_text())
    frac = info["prunable_macs_fraction"]
    print(f"PP-OCRv4 det: prunable_macs_fraction = {frac:.4f}, MACs = {info['macs']:,}, "
          f"{sum(g['prunable'] for g in info['groups'])}/{len(info['groups'])} groups prunable")
    assert frac >= 0.9
    assert info["macs"] > 1e9  # ~2.3 GMACs at 640x640
    assert sum(g["prunable"] for g in info["groups"]) >= 20
    for g in info["groups"]:
        assert (g["reason"] is None) == g["prunable"]


def test_prune_meets_target_and_verifies(pruned):
    rep = pruned["rep"]
    ratio = rep["macs_after"] / rep["macs_before"]
    print(f"PP-OCRv4 det l1 @ {TARGET}: MACs x{ratio:.3f}, params {rep['params_before']:,} -> {rep['params_after']:,}, "
          f"max abs diff {rep['verification']['max_abs_diff']:.3g}")
    assert rep["verification"]["passed"] is True
    assert ratio <= TARGET + 0.01
    assert ratio > TARGET - 0.15
    assert rep["params_after"] < rep["params_before"]
    assert sum(g["width_after"] < g["width_before"] for g in rep["groups"]) >= 10
    assert "verify  passed" in pruned["stdout"]


def test_pruned_model_keeps_dynamic_dims(pruned):
    model = onnx.load(pruned["onnx"])
    (inp,) = [i for i in model.graph.input if i.name == "x"]
    dims = inp.type.tensor_type.shape.dim
    assert dims[1].dim_value == 3
    assert all(not d.HasField("dim_value") for k, d in enumerate(dims) if k != 1)
    sess = ort.InferenceSession(str(pruned["onnx"]), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 640, 480)).astype(np.float32)
    (y,) = sess.run(None, {"x": x})
    assert y.shape == (1, 1, 640, 480)
    assert np.isfinite(y).all() and 0 <= y.min() and y.max() <= 1  # a sigmoid map


def test_pruned_model_verifies_at_another_size(pruned, ppocr_det):
    """The plan made at 320x320 re-applies (same fingerprint) and matches the masked original at 160x224."""
    proc = run_cli("verify", ppocr_det, pruned["onnx"], "--plan", pruned["plan"], "--input-shape", "x:2,3,160,224")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert proc.stdout.startswith("passed")
