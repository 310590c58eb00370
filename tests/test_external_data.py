"""Models whose weights live in an external data file: load, prune, apply and verify through the CLI.

The model is saved with `save_as_external_data=True, all_tensors_to_one_file=True, location="w.data",
size_threshold=0`, so every initializer (even the 1-element ones) sits in `w.data`. A pruned model of
such a file must come out the same way: `OUT` small, its weights in `OUT.data` beside it.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from aofp_onnx.graph import read_model
from cliutil import ok, run_cli

IR_VERSION = 8
L1_HALF = ("--calib", "random:4", "--criterion", "l1", "--flops-target", "0.5")


def small_cnn() -> onnx.ModelProto:
    """x[N,3,12,12] → Conv 3→32 → Relu → Conv 32→48 (stride 2) → BN → Relu → GAP → Flatten
    → Gemm 48→10."""
    rng = np.random.default_rng(7)

    def init(name, value):
        return numpy_helper.from_array(np.asarray(value, np.float32), name)

    inits = [
        init("c1.w", rng.normal(0, 0.3, (32, 3, 3, 3))), init("c1.b", rng.uniform(-0.2, 0.2, 32)),
        init("c2.w", rng.normal(0, 0.06, (48, 32, 3, 3))), init("c2.b", rng.uniform(-0.2, 0.2, 48)),
        init("bn.s", rng.uniform(0.5, 1.5, 48)), init("bn.b", rng.uniform(-0.2, 0.2, 48)),
        init("bn.m", rng.uniform(-0.2, 0.2, 48)), init("bn.v", rng.uniform(0.5, 1.5, 48)),
        init("fc.w", rng.normal(0, 0.2, (10, 48))), init("fc.b", rng.uniform(-0.2, 0.2, 10)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1] * 4,
                         strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c2", "bn.s", "bn.b", "bn.m", "bn.v"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "ext", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=IR_VERSION)


def save_external(model: onnx.ModelProto, path: pathlib.Path) -> None:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.data", size_threshold=0)


def digest(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def external_locations(path) -> dict[str, str]:
    """Initializer name → its external data location, as written in the file (weights not loaded)."""
    m = onnx.load(str(path), load_external_data=False)
    out = {}
    for t in m.graph.initializer:
        if onnx.external_data_helper.uses_external_data(t):
            out[t.name] = next(e.value for e in t.external_data if e.key == "location")
    return out


def run(path, x) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def ext(tmp_path_factory) -> dict:
    """The external-data model in src/, pruned by the CLI into out/ (another folder), with its plan."""
    root = tmp_path_factory.mktemp("ext")
    src, out = root / "src", root / "out"
    src.mkdir()
    out.mkdir()
    model = src / "m.onnx"
    save_external(small_cnn(), model)
    before = {p.name: digest(p) for p in src.iterdir()}
    pruned, plan, report = out / "pruned.onnx", out / "plan.json", out / "report.json"
    proc = ok(run_cli("prune", model, "-o", pruned, *L1_HALF, "--plan-out", plan, "--report", report,
                      "--no-progress", cwd=root))
    return {"root": root, "src": src, "out": out, "model": model, "pruned": pruned, "plan": plan,
            "report": json.loads(report.read_text()), "before": before, "proc": proc}


def test_the_fixture_model_really_uses_external_data(ext):
    files = sorted(p.name for p in ext["src"].iterdir())
    assert files == ["m.onnx", "w.data"]
    locations = external_locations(ext["model"])
    assert len(locations) == 10 and set(locations.values()) == {"w.data"}
    assert os.path.getsize(ext["model"]) < 2048 < os.path.getsize(ext["src"] / "w.data")


def test_read_model_loads_the_external_weights(ext):
    model, external = read_model(ext["model"])
    assert external is True
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert weights["c2.w"].shape == (48, 32, 3, 3)
    want = numpy_helper.to_array(small_cnn().graph.initializer[2])
    np.testing.assert_array_equal(weights["c2.w"], want)


def test_prune_writes_the_output_with_external_data(ext):
    pruned, data = ext["pruned"], ext["out"] / "pruned.onnx.data"
    assert data.is_file()
    assert os.path.getsize(pruned) < 8192, "the weights belong in the .data file"
    assert os.path.getsize(data) > 4 * os.path.getsize(pruned)
    assert os.path.getsize(data) < os.path.getsize(ext["src"] / "w.data")  # fewer weights than the original
    locations = external_locations(pruned)
    assert locations and set(locations.values()) == {"pruned.onnx.data"}  # relative to the output's folder
    assert sorted(p.name for p in ext["out"].iterdir()) == ["plan.json", "pruned.onnx", "pruned.onnx.data",
                                                            "report.json"]
    assert {p.name: digest(p) for p in ext["src"].iterdir()} == ext["before"], "the input must not change"


def test_pruned_external_model_loads_checks_and_runs(ext):
    model = onnx.load(str(ext["pruned"]))  # external data loaded from beside the file
    onnx.checker.check_model(str(ext["pruned"]), full_check=True)
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    rep = ext["report"]
    assert rep["macs_after"] < rep["macs_before"] and rep["verification"]["passed"]
    widths = {g["id"]: g["width_after"] for g in rep["groups"]}
    assert sorted(widths) == ["c1", "c2"]
    assert w["c1.w"].shape == (widths["c1"], 3, 3, 3)
    assert w["c2.w"].shape == (widths["c2"], widths["c1"], 3, 3)
    assert w["fc.w"].shape == (10, widths["c2"])
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
    y = run(ext["pruned"], x)
    assert y.shape == (2, 10) and np.all(np.isfinite(y))


def test_cli_verify_accepts_the_external_pruned_model(ext):
    proc = ok(run_cli("verify", ext["model"], ext["pruned"], "--plan", ext["plan"]))
    assert proc.stdout.startswith("passed")


def test_cli_verify_rejects_a_plan_that_does_not_match(ext, tmp_path):
    plan = json.loads(ext["plan"].read_text())
    for entry in plan["groups"].values():  # keep every channel: the pruned file cannot equal that
        entry["keep"] = list(range(entry["width"]))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(plan))
    proc = run_cli("verify", ext["model"], ext["pruned"], "--plan", wrong)
    assert proc.returncode == 3 and proc.stdout.startswith("FAILED"), proc.stdout + proc.stderr


def test_apply_writes_external_data_too_and_matches_prune(ext):
    out = ext["out"] / "applied"
    out.mkdir(exist_ok=True)
    applied = out / "applied.onnx"
    ok(run_cli("apply", ext["model"], "--plan", ext["plan"], "-o", applied))
    assert (out / "applied.onnx.data").is_file()
    assert os.path.getsize(applied) < 8192
    assert set(external_locations(applied).values()) == {"applied.onnx.data"}
    onnx.checker.check_model(str(applied), full_check=True)
    x = np.random.default_rng(1).standard_normal((3, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(run(applied, x), run(ext["pruned"], x), rtol=1e-6, atol=1e-6)
    ok(run_cli("verify", ext["model"], applied, "--plan", ext["plan"]))
    assert {p.name: digest(p) for p in ext["src"].iterdir()} == ext["before"]


def test_missing_external_data_file_is_refused_in_one_line(ext, tmp_path):
    lonely = tmp_path / "m.onnx"
    shutil.copy(ext["model"], lonely)  # without its w.data
    out = tmp_path / "out.onnx"
    for args in (("prune", lonely, "-o", out, *L1_HALF), ("inspect", lonely),
                 ("apply", lonely, "--plan", ext["plan"], "-o", out)):
        proc = run_cli(*args)
        assert proc.returncode == 2, f"{args[0]}: exit {proc.returncode}\n{proc.stderr}"
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("aofp-onnx: error: ") and "m.onnx" in lines[0]
        assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"], "nothing may be written"
