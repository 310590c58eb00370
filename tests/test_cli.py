"""The CLI contract (DESIGN.md, Interfaces): JSON keys, exit codes, and what each command really does.

Commands run as real processes (`python -m aofp_onnx ...`); the zoo model is built once per module
and pruned once (L1, half the MACs) into a shared folder the tests read from.
"""
from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import zoo
from cliutil import ok, run_cli

REPO = pathlib.Path(__file__).resolve().parents[1]
L1_HALF = ("--calib", "random:8", "--criterion", "l1", "--flops-target", "0.5")


def ort_outputs(path, feeds) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> zoo.ZooModel:
    return zoo.build("resnet_basic", tmp_path_factory.mktemp("cli_model"))


@pytest.fixture(scope="module")
def pruned(model, tmp_path_factory) -> dict:
    """prune --criterion l1 --flops-target 0.5 with --report, --plan-out and --plot."""
    d = tmp_path_factory.mktemp("cli_pruned")
    out = {"dir": d, "onnx": d / "pruned.onnx", "report": d / "report.json", "plan": d / "plan.json",
           "plot": d / "widths.png"}
    proc = ok(run_cli("prune", model.path, "-o", out["onnx"], *L1_HALF, "--report", out["report"],
                      "--plan-out", out["plan"], "--plot", out["plot"], cwd=d))
    out["proc"] = proc
    out["rep"] = json.loads(out["report"].read_text())
    out["plan_json"] = json.loads(out["plan"].read_text())
    return out


# --- inspect -----------------------------------------------------------------------------------------

def test_inspect_json_contract_and_table(model, tmp_path):
    proc = ok(run_cli("inspect", model.path, "--json", tmp_path / "info.json"))
    info = json.loads((tmp_path / "info.json").read_text())
    for key in ("macs", "params", "prunable_macs_fraction", "groups"):
        assert key in info, key
    assert info["macs"] == model.torch_macs == 13_549_888  # torch forward hooks count the same MACs
    params = sum(int(np.prod(t.dims)) for t in onnx.load(model.path).graph.initializer)
    assert info["params"] == params == 38_346
    assert 0.0 <= info["prunable_macs_fraction"] <= 1.0
    assert info["prunable_macs_fraction"] == pytest.approx(1.0)  # every conv touches a prunable group
    groups = info["groups"]
    assert len(groups) == 7
    for g in groups:
        assert {"id", "width", "macs", "prunable", "reason"} <= set(g), g
        assert isinstance(g["width"], int) and g["width"] >= 1
        assert isinstance(g["macs"], int) and g["macs"] >= 0
        assert (g["reason"] is None) == g["prunable"], g
        if not g["prunable"]:
            assert isinstance(g["reason"], str) and g["reason"].strip()
    prunable = [g for g in groups if g["prunable"]]
    assert sorted(g["width"] for g in prunable) == [16, 16, 32, 32, 32]
    by_id = {g["id"]: g for g in groups}
    assert by_id["input"]["reason"] == "comes from model input 'input'"
    assert "model output" in by_id["logits"]["reason"]

    out = proc.stdout
    assert "MACs 13,549,888" in out and "params 38,346" in out
    assert "groups 7 (5 prunable)" in out and "prunable MACs 100.0%" in out
    header = next(line for line in out.splitlines() if line.startswith("group"))
    assert header.split() == ["group", "width", "MACs*", "status"]  # * explained below the table
    for g in groups:
        row = next(line for line in out.splitlines() if line.startswith(g["id"] + " "))
        assert f"{g['macs']:,}" in row and str(g["width"]) in row.split()
        assert row.rstrip().endswith("prunable" if g["prunable"] else g["reason"])


def test_inspect_without_json_writes_nothing(model, tmp_path):
    proc = ok(run_cli("inspect", model.path, cwd=tmp_path))
    assert "prunable" in proc.stdout
    assert list(tmp_path.iterdir()) == []


# --- prune -------------------------------------------------------------------------------------------

def test_prune_report_contract(pruned, model):
    rep = pruned["rep"]
    for key in ("macs_before", "macs_after", "params_before", "params_after", "criterion", "groups",
                "verification", "latency_ms", "search"):
        assert key in rep, key
    assert rep["criterion"] == "l1"
    assert rep["macs_before"] == model.torch_macs
    assert 0 < rep["macs_after"] / rep["macs_before"] <= 0.5 + 0.01
    assert rep["macs_after"] / rep["macs_before"] > 0.3  # the target is met, not wildly overshot
    assert 0 < rep["params_after"] < rep["params_before"] == 38_346
    assert len(rep["groups"]) == 5
    for g in rep["groups"]:
        assert {"id", "width_before", "width_after"} <= set(g)
        assert 1 <= g["width_after"] <= g["width_before"]
    assert any(g["width_after"] < g["width_before"] for g in rep["groups"])
    v = rep["verification"]
    assert v["passed"] is True
    assert 0 <= v["max_abs_diff"] < 1e-3
    lat = rep["latency_ms"]
    assert {"before", "after", "provider"} <= set(lat)
    assert lat["before"] > 0 and lat["after"] > 0
    assert lat["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert rep["search"]["trials"] == 0 and rep["search"]["seconds"] >= 0


def test_prune_writes_a_valid_smaller_model_and_says_so(pruned, model):
    out = pruned["proc"].stdout
    assert f"wrote {pruned['onnx']}" in out
    assert re.search(r"verify\s+passed", out)
    assert "warning: random:8 is synthetic data" in pruned["proc"].stderr
    m = onnx.load(pruned["onnx"])
    onnx.checker.check_model(m, full_check=True)
    feeds = model.feeds(batch=3)
    (y,) = ort_outputs(pruned["onnx"], feeds)
    assert y.shape == (3, 10) and np.isfinite(y).all()
    # report widths are the conv widths in the written model
    widths = {g["id"]: g["width_after"] for g in pruned["rep"]["groups"]}
    convs = {n.output[0]: n for n in m.graph.node if n.op_type == "Conv"}
    inits = {i.name: i for i in m.graph.initializer}
    for gid, width in widths.items():
        w = numpy_helper.to_array(inits[convs[gid].input[1]])
        assert w.shape[0] == width, gid
    # plan keeps exactly those channels
    plan = pruned["plan_json"]
    assert plan["format"] == "aofp-onnx/plan@1" and plan["criterion"] == "l1"
    assert {gid: len(e["keep"]) for gid, e in plan["groups"].items()} == widths


def test_plot_writes_a_png(pruned):
    data = pruned["plot"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000


def test_no_temp_files_left_after_prune(pruned):
    names = sorted(p.name for p in pruned["dir"].iterdir())
    assert names == ["plan.json", "pruned.onnx", "report.json", "widths.png"]


# --- apply / verify ----------------------------------------------------------------------------------

def test_apply_plan_reproduces_the_pruned_model(pruned, model, tmp_path):
    out = tmp_path / "applied.onnx"
    proc = ok(run_cli("apply", model.path, "--plan", pruned["plan"], "-o", out, "--report", tmp_path / "r.json"))
    assert f"wrote {out}" in proc.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["verification"]["passed"] is True
    assert rep["macs_after"] == pruned["rep"]["macs_after"]
    assert rep["groups"] == pruned["rep"]["groups"]
    a, b = onnx.load(out), onnx.load(pruned["onnx"])
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    for ia, ib in zip(sorted(a.graph.initializer, key=lambda t: t.name),
                      sorted(b.graph.initializer, key=lambda t: t.name)):
        assert ia.name == ib.name
        np.testing.assert_array_equal(numpy_helper.to_array(ia), numpy_helper.to_array(ib))
    feeds = model.feeds(batch=4, seed=5)
    for ya, yb in zip(ort_outputs(out, feeds), ort_outputs(pruned["onnx"], feeds)):
        np.testing.assert_array_equal(ya, yb)


def test_verify_passes_on_the_pruned_model(pruned, model):
    proc = run_cli("verify", model.path, pruned["onnx"], "--plan", pruned["plan"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("passed: max abs diff")


def test_verify_fails_on_another_cut_for_the_same_plan(pruned, model, tmp_path):
    heavier = tmp_path / "heavier.onnx"
    ok(run_cli("prune", model.path, "-o", heavier, "--calib", "random:8", "--criterion", "l1",
               "--flops-target", "0.25"))
    proc = run_cli("verify", model.path, heavier, "--plan", pruned["plan"])
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert proc.stdout.startswith("FAILED")


def test_verify_fails_on_tampered_weights(pruned, model, tmp_path):
    """Same widths, one conv weight changed a little: the layer-by-layer comparison catches it."""
    m = onnx.load(pruned["onnx"])
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    init = next(i for i in m.graph.initializer if i.name == conv.input[1])
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 0.05 * float(np.abs(w).max())
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(m, tmp_path / "tampered.onnx")
    proc = run_cli("verify", model.path, tmp_path / "tampered.onnx", "--plan", pruned["plan"])
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert proc.stdout.startswith("FAILED")


# --- selection options (in one process per run; plans compared) -----------------------------------

def _prune_plan(model, d, name, *extra) -> tuple[dict, dict]:
    out, plan, rep = d / f"{name}.onnx", d / f"{name}.plan.json", d / f"{name}.report.json"
    ok(run_cli("prune", model.path, "-o", out, "--calib", "random:4", "--plan-out", plan, "--report", rep, *extra))
    return json.loads(plan.read_text()), json.loads(rep.read_text())


def test_random_criterion_is_seeded(model, tmp_path):
    args = ("--criterion", "random", "--flops-target", "0.5")
    a, rep_a = _prune_plan(model, tmp_path, "a", *args, "--seed", "1")
    b, _ = _prune_plan(model, tmp_path, "b", *args, "--seed", "1")
    c, _ = _prune_plan(model, tmp_path, "c", *args, "--seed", "2")
    assert a["groups"] == b["groups"]
    assert a["groups"] != c["groups"]
    assert rep_a["criterion"] == "random" and rep_a["verification"]["passed"]
    assert rep_a["macs_after"] / rep_a["macs_before"] <= 0.51


def test_round_to_gives_multiples(model, tmp_path):
    _, rep = _prune_plan(model, tmp_path, "r4", "--criterion", "l1", "--flops-target", "0.5", "--round-to", "4")
    widths = [(g["width_before"], g["width_after"]) for g in rep["groups"]]
    assert all(after % 4 == 0 or after == before for before, after in widths), widths
    assert any(after < before for before, after in widths)
    assert rep["verification"]["passed"]
    assert rep["macs_after"] / rep["macs_before"] <= 0.5 + 0.05


@pytest.mark.parametrize("step", [4, 8])
def test_report_checks_the_widths_against_tensorrts_multiples(model, tmp_path, step):
    """round_to.tensorrt names the narrowed groups off FP16's multiple of 8 and INT8's of 32; the summary
    says how many, and nothing when the cut is aligned."""
    args = ("--criterion", "l1", "--flops-target", "0.5", "--round-to", str(step))
    out, rep = tmp_path / "t.onnx", tmp_path / "t.json"
    proc = ok(run_cli("prune", model.path, "-o", out, "--calib", "random:4", "--report", rep, *args))
    trt = json.loads(rep.read_text())["round_to"]["tensorrt"]
    groups = json.loads(rep.read_text())["groups"]
    for precision, k in (("fp16", 8), ("int8", 32)):
        judged = [g for g in groups if g["width_after"] != g["width_before"] and g["width_before"] >= k]
        assert trt[precision]["multiple"] == k and trt[precision]["narrowed"] == len(judged) > 0
        assert trt[precision]["off"] == [g["id"] for g in judged if g["width_after"] % k]
    assert (trt["fp16"]["off"] == []) == (step == 8)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("tensorrt ")), None)
    assert line == ("tensorrt " + "; ".join(f"{len(trt[p]['off'])} of {trt[p]['narrowed']} narrowed groups off "
                                            f"{p.upper()}'s multiple of {trt[p]['multiple']}" for p in trt)
                    + " (--round-to 8 or 32 aligns them)")


def test_min_channels_is_respected(model, tmp_path):
    _, low = _prune_plan(model, tmp_path, "low", "--criterion", "l1", "--flops-target", "0.02", "--round-to", "1")
    assert min(g["width_after"] for g in low["groups"]) < 3  # the bound matters at this target
    _, rep = _prune_plan(model, tmp_path, "m3", "--criterion", "l1", "--flops-target", "0.02", "--min-channels", "3",
                         "--round-to", "1")
    assert all(g["width_after"] >= 3 for g in rep["groups"]), rep["groups"]
    assert rep["verification"]["passed"]


# --- bench / help ------------------------------------------------------------------------------------

def test_bench_prints_both_models_with_ratio(pruned, model, tmp_path):
    proc = ok(run_cli("bench", model.path, pruned["onnx"], "--repeats", "5", "--warmup", "1",
                      "--json", tmp_path / "b.json"))
    lines = proc.stdout.splitlines()
    assert "ratio" in lines[0].split() and "median" in lines[0]
    assert "(batch 1," in lines[0]  # one configuration: no heading per batch/shape
    rows = lines[1:]
    assert len(rows) == 2
    assert rows[0].split()[0] == model.path.name and rows[1].split()[0] == pruned["onnx"].name
    assert float(rows[0].split()[-1]) == pytest.approx(1.0)
    assert float(rows[1].split()[-1]) > 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert [r["model"] for r in data] == [str(model.path), str(pruned["onnx"])]
    assert all(r["median_ms"] > 0 for r in data)
    assert data[0]["ratio"] == 1.0 and data[1]["ratio"] == pytest.approx(data[1]["median_ms"] / data[0]["median_ms"])


@pytest.mark.parametrize("entry", ["module", "checkout"])
def test_help(entry):
    cmd = [sys.executable, "-m", "aofp_onnx", "--help"] if entry == "module" else [sys.executable, "cli.py", "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("inspect", "prune", "apply", "verify", "bench"):
        assert re.search(rf"^\s+{command}\b", proc.stdout, re.M), command


def test_subcommand_help_lists_contract_options():
    proc = subprocess.run([sys.executable, "-m", "aofp_onnx", "prune", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    for opt in ("--calib", "--criterion", "--flops-target", "--threshold", "--trials-per-half", "--batch-size",
                "--round-to", "--min-channels", "--provider", "--seed", "--input-shape", "--plan-out", "--report"):
        assert opt in proc.stdout, opt
