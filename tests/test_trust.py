"""Results a user can trust (issue 12): output fidelity on held-out samples with a collapse warning, the
best fine-tuning epoch really kept, exit code 3 for a failed verification, progress with elapsed time,
target and ETA, options checked before any work, readable groups, and outputs that honour the umask.

Fidelity (`aofp_onnx.fidelity`) per output over the held-out samples: e = ‖y − y₀‖ / ‖y₀‖,
c = mean_i cos(y_i, y₀_i), a = share of equal argmax over axis 1 (class scores only); collapsed when
e > 0.75, c < 0.5 or a < 0.5. The tests recompute these with numpy from onnxruntime's outputs.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import stat
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from aofp_onnx import api, cli, progress, pruner, search
from aofp_onnx import fidelity as fid
from aofp_onnx.calib import Data
from aofp_onnx.modeldata import split_weights
from aofp_onnx.progress import Phases, SearchProgress
from aofp_onnx.verify import Verification
from cliutil import ok, run_cli

REPO = pathlib.Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
CNN, CALIB, TEST = MODELS / "mnist_cnn.onnx", MODELS / "mnist_calib.npz", MODELS / "mnist_test.npz"


def _gemm_model(w: np.ndarray, maps: np.ndarray) -> onnx.ModelProto:
    """x[N, 8] → logits = x·w [N, 4] and map = x·maps reshaped to [N, 1, 2, 3] (a dense output)."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"]),
             helper.make_node("MatMul", ["x", "m"], ["flat"]),
             helper.make_node("Reshape", ["flat", "shape"], ["map"])]
    inits = [numpy_helper.from_array(w.astype(np.float32), "w"), numpy_helper.from_array(maps.astype(np.float32), "m"),
             numpy_helper.from_array(np.array([-1, 1, 2, 3], np.int64), "shape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4]),
                               helper.make_tensor_value_info("map", TensorProto.FLOAT, ["N", 1, 2, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _numpy_fidelity(y: np.ndarray, y0: np.ndarray) -> dict:
    y, y0 = y.reshape(len(y), -1).astype(np.float64), y0.reshape(len(y0), -1).astype(np.float64)
    cos = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(y, y0)]
    return {"rel_error": np.linalg.norm(y - y0) / np.linalg.norm(y0), "cosine": float(np.mean(cos)),
            "top1": float(np.mean(y.argmax(1) == y0.argmax(1)))}


# --- 1. fidelity ------------------------------------------------------------------------------------------
def test_fidelity_equals_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    w, m = rng.normal(size=(8, 4)), rng.normal(size=(8, 6))
    noise_w, noise_m = 0.3 * rng.normal(size=(8, 4)), 0.3 * rng.normal(size=(8, 6))
    x = rng.normal(size=(37, 8)).astype(np.float32)
    data = Data({"x": x}, None, "test", False)
    original, candidate = split_weights(_gemm_model(w, m)), split_weights(_gemm_model(w + noise_w, m + noise_m))
    got = fid.fidelity(original, candidate, data, "cpu", batch_size=16)  # 3 batches: 16, 16, 5
    x64 = x.astype(np.float64)
    logits = _numpy_fidelity(x64 @ (w + noise_w), x64 @ w)
    dense = _numpy_fidelity(x64 @ (m + noise_m), x64 @ m)
    by_name = {o["name"]: o for o in got["outputs"]}
    assert got["samples"] == 37 and got["held_out"] is True
    assert by_name["logits"]["rel_error"] == pytest.approx(logits["rel_error"], rel=1e-5)
    assert by_name["logits"]["cosine"] == pytest.approx(logits["cosine"], rel=1e-5)
    assert by_name["logits"]["top1_agreement"] == pytest.approx(logits["top1"])
    assert by_name["map"]["rel_error"] == pytest.approx(dense["rel_error"], rel=1e-5)
    assert by_name["map"]["cosine"] == pytest.approx(dense["cosine"], rel=1e-5)
    assert by_name["map"]["top1_agreement"] is None  # [N, 1, 2, 3] is a map, not class scores
    assert 0.1 < logits["rel_error"] < 0.75 and logits["cosine"] > 0.5 and logits["top1"] > 0.5
    assert got["collapsed"] is False
    # a candidate whose map is wiped out (all zero) collapses: e = 1, c = 0
    wiped = fid.fidelity(original, split_weights(_gemm_model(w, 0 * m)), data, "cpu")
    by_name = {o["name"]: o for o in wiped["outputs"]}
    assert by_name["map"]["rel_error"] == pytest.approx(1.0) and by_name["map"]["cosine"] == 0.0
    assert by_name["map"]["collapsed"] and not by_name["logits"]["collapsed"] and wiped["collapsed"]


def test_held_out_samples_are_the_last_of_the_calibration_data():
    with np.load(CALIB) as c:
        x = c["input"]
    p = api.Pruner.load(CNN, data=str(CALIB), hold_out=True)
    assert (len(p.data), len(p.held)) == (192, 64)  # a quarter of 256, at most 64
    np.testing.assert_array_equal(p.held.inputs["input"], x[192:])
    np.testing.assert_array_equal(p.data.inputs["input"], x[:192])
    p = api.Pruner.load(CNN, data=str(CALIB), limit=100, hold_out=True)  # --calib-limit 100: 100 searched
    assert (len(p.data), len(p.held)) == (100, 64)
    np.testing.assert_array_equal(p.held.inputs["input"], x[100:164])


def test_a_collapsed_cut_warns_loudly_and_reports_numpy_exact_fidelity(tmp_path):
    out, report = tmp_path / "cut.onnx", tmp_path / "r.json"
    proc = ok(run_cli("prune", CNN, "-o", out, "--calib", CALIB, "--criterion", "l1", "--flops-target", "0.3",
                      "--no-latency", "--report", report))
    rep = json.loads(report.read_text())
    f = rep["fidelity"]
    assert f["samples"] == 64 and f["held_out"] and f["collapsed"] is True
    with np.load(CALIB) as c:
        held = c["input"][192:]
    y0 = ort.InferenceSession(str(CNN), providers=["CPUExecutionProvider"]).run(None, {"input": held})[0]
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": held})[0]
    want = _numpy_fidelity(y, y0)
    (logits,) = f["outputs"]
    assert logits["rel_error"] == pytest.approx(want["rel_error"], rel=1e-4)
    assert logits["cosine"] == pytest.approx(want["cosine"], rel=1e-4, abs=1e-6)
    assert logits["top1_agreement"] == pytest.approx(want["top1"])
    assert logits["top1_agreement"] < 0.3  # the plain cut is at chance
    assert "<- COLLAPSED" in proc.stdout and "fidelity pruned vs original on 64 held-out samples" in proc.stdout
    assert "WARNING: the output collapsed ('logits')" in proc.stderr
    assert "Try: --reconstruct" in proc.stderr and "--flops-target 0.5" in proc.stderr
    assert "--criterion descent" in proc.stderr  # a classifier: its landing read the output error
    assert rep["latency_ms"] is None  # --no-latency
    assert not any(line.startswith("latency") for line in proc.stdout.splitlines())


# --- 2. fine-tuning keeps what it says it keeps -------------------------------------------------------------
@pytest.mark.slow
def test_finetune_writes_the_best_epoch_not_the_last(tmp_path, monkeypatch):
    """Epoch 1 trains; epochs 2 and 3 are made to diverge (parameters scrambled after their steps). The
    written model must score the best epoch's validation loss (one batch: Σ‖s − t‖² / Σ‖t‖²)."""
    torch = pytest.importorskip("torch")
    from aofp_onnx import finetune as ft
    from aofp_onnx.bridge import train

    cut = tmp_path / "cut.onnx"
    api.prune(CNN, cut, calib=str(CALIB), criterion="l1", flops_target=0.5, latency=False, provider="cpu")
    with np.load(CALIB) as c:
        x = c["input"]
    np.savez(tmp_path / "train.npz", input=x[:64])
    np.savez(tmp_path / "val.npz", input=x[64:96])
    real_steps = train.TorchTraining._steps

    def diverging(self, n, total, done, show):
        loss = real_steps(self, n, total, done, show)
        if done > 0:  # after the first epoch
            with torch.no_grad():
                for p in self.params:
                    p.add_(torch.randn_like(p) * p.abs().mean() * 3)
        return loss

    monkeypatch.setattr(train.TorchTraining, "_steps", diverging)
    rep = api.finetune(cut, tmp_path / "tuned.onnx", data=str(tmp_path / "train.npz"), val=str(tmp_path / "val.npz"),
                       teacher=str(CNN), options=ft.Options(epochs=3, lr=1e-3, batch_size=32), provider="cpu")
    losses = [h["val_loss"] for h in rep["history"]]
    assert rep["best"]["epoch"] == 1 and losses[1] < losses[0] and min(losses[2:]) > 2 * losses[1], losses
    assert rep["distill_error"]["after"] == pytest.approx(losses[1], rel=1e-3)  # the written model = epoch 1
    assert rep["fidelity"]["outputs"][0]["rel_error"] == pytest.approx(losses[1] ** 0.5, rel=1e-3)


@pytest.mark.slow
def test_training_time_aofp_writes_back_copies(tmp_path):
    """After a half, the working graph holds the trained values; training on must not move them."""
    pytest.importorskip("torch")
    from aofp_onnx import finetune as ft
    from aofp_onnx.masking import KEEP_INPUT, keep_feed

    pruner = api.Pruner.load(CNN, data=str(CALIB), limit=64)
    tuner = api._base_path_tuner(pruner, "aofp", 2, str(CALIB), ft.Options(lr=1e-3, batch_size=16), None, 0)
    keep = pruner.cmap.full_keep()
    keep[pruner.cmap.prunable[0].slots[:8]] = False
    before = {k: v.copy() for k, v in pruner.graph.weights.items()}
    tuner(keep)
    written = {k: v.copy() for k, v in pruner.graph.weights.items()}
    moved = max(float(np.abs(written[k] - before[k]).max()) for k in before)
    assert moved > 1e-4  # the half's fine-tuning changed the working graph
    tuner.training.train(steps=3, constants={KEEP_INPUT: keep_feed(keep)})  # trains on, no write-back
    drift = max(float(np.abs(pruner.graph.weights[k] - written[k]).max()) for k in written)
    assert drift == 0.0


# --- 3. exit codes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["prune", "apply"])
def test_a_failed_verification_exits_3_and_writes_nothing(tmp_path, monkeypatch, command, capsys):
    plan = tmp_path / "plan.json"
    api.prune(CNN, tmp_path / "first.onnx", calib="random:8", criterion="l1", flops_target=0.5, latency=False,
              provider="cpu", plan_out=plan)
    monkeypatch.setattr(pruner, "verify", lambda *a, **k: Verification(0.5, 0.5, False, "cpu", 4, "worst output 'x'"))
    out = tmp_path / "out.onnx"
    args = (["prune", str(CNN), "-o", str(out), "--calib", "random:8", "--criterion", "l1", "--flops-target", "0.5"]
            if command == "prune" else ["apply", str(CNN), "--plan", str(plan), "-o", str(out)])
    with pytest.raises(SystemExit) as exit_:
        cli.main(args + ["--report", str(tmp_path / "r.json")])
    assert exit_.value.code == 3
    assert "verification failed" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "r.json").exists()


# --- 4. progress ------------------------------------------------------------------------------------------
def test_phases_say_what_runs_with_elapsed_time(capsys):
    import time

    with Phases(True, delay=0.05)("verify", "comparing on 4 samples"):
        time.sleep(0.3)
    with Phases(True, delay=5)("write", "out.onnx"):  # shorter than its delay: silent
        pass
    with Phases(False, delay=0)("latency", "timing"):
        pass
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "verify: comparing on 4 samples ..."
    assert err[1].startswith("verify: done in ") and float(err[1].split()[3]) >= 0.3
    assert len(err) == 2


def _tiny_cmap(tmp_path):
    rng = np.random.default_rng(0)
    inits, nodes, x, cin = [], [], "input", 2
    for k, w in enumerate([8, 16, 4]):
        inits.append(numpy_helper.from_array(rng.normal(size=(w, cin, 3, 3)).astype(np.float32), f"w{k}"))
        nodes.append(helper.make_node("Conv", [x, f"w{k}"], [f"conv{k}"], pads=[1, 1, 1, 1], name=f"conv{k}"))
        x, cin = f"conv{k}", w
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 8, 8])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "t.onnx")
    return api.Pruner.load(tmp_path / "t.onnx").cmap


def test_search_line_shows_target_eta_and_threshold_raises(tmp_path, capsys):
    """Every channel equally important (a trial's damage = the share of the group it removes): nothing is
    under the threshold 0.01, every group saturates, and the threshold grows until a half goes (raises
    between two rounds are said once)."""
    cm = _tiny_cmap(tmp_path)

    def damage(keep, rows):
        return np.stack([((rows[:, g.slots] == 0) & keep[g.slots]).sum(1) / keep[g.slots].sum()
                         for g in cm.prunable], axis=1)

    show = SearchProgress("aofp", {"MACs": 0.5})
    keep, _, stats = search.aofp(cm, damage, threshold=0.01, trials_per_half=4, flops_target=0.5, stack=4,
                                 progress=show)
    show.close()  # in a log, the final status is written even when the 10-round rhythm skipped it
    err = capsys.readouterr().err.splitlines()
    raises = [line for line in err if "threshold raised" in line]
    assert raises[0].startswith("aofp: every group saturated before the target at MACs x1.000: threshold raised "
                                "0.01 -> ")
    raised = [float(re.search(r"-> (\S+),", line).group(1)) for line in raises]
    assert raised == sorted(raised) and raised[-1] == pytest.approx(stats.threshold, rel=1e-2)
    steps = np.log(np.array(raised) / 0.01) / np.log(search.THRESHOLD_GROWTH)  # whole raises of 1.25 each
    assert np.allclose(steps, np.round(steps), atol=0.05) and steps[-1] >= 3
    status = [line for line in err if "trials" in line]
    assert status[0].startswith("aofp: 4 trials, MACs x1.000 (target x0.500), 2/2 groups searching, ")
    assert status[-1].startswith(f"aofp: {stats.trials} trials, MACs x{cm.macs(keep) / cm.total_macs:.3f} ")
    assert cm.macs(keep) <= 0.5 * cm.total_macs
    assert show.eta({"macs": 0.75}, 10, 30.0) == pytest.approx(30.0)  # half way from x1 to x0.5 after 30 s
    assert SearchProgress("aofp", {"MACs": 0.5, "latency": 0.6}).eta({"macs": 0.75, "latency": 0.9}, 0, 30.0) \
        == pytest.approx(30.0)  # the measure furthest along decides


def test_a_log_gets_a_status_line_at_least_every_30_s_of_slow_rounds(capsys, monkeypatch):
    """In a log the search writes every 10th round, and also any round that ends LOG_EVERY_S after the last
    line: rounds of a minute (a detector at 800x608 on 2 cores) are not 10 minutes of silence."""
    clock = [0.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    show = SearchProgress("aofp", {"MACs": 0.5})
    for rounds, seconds in ((1, 5.0), (2, 10.0), (3, 20.0), (4, 36.0), (5, 40.0), (6, 70.0), (11, 75.0)):
        clock[0] = seconds
        show(SimpleNamespace(trials=8 * rounds, rounds=rounds, threshold=0.01), 0.9, 3, 3)
    written = [line for line in capsys.readouterr().err.splitlines() if "trials" in line]
    assert [line.split(" trials")[0] for line in written] == ["aofp: 8", "aofp: 32", "aofp: 48", "aofp: 88"]
    assert written[1].endswith("36 s, ETA ~144 s")


# --- 5. checks before work ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["plot without matplotlib", "report folder missing", "plan over the output",
                                  "eval data missing", "finetune framework missing"])
def test_options_that_would_fail_late_are_refused_first(tmp_path, case):
    out, plan, report = tmp_path / "o.onnx", tmp_path / "p.json", tmp_path / "r.json"
    args = ["prune", str(CNN), "-o", str(out), "--calib", str(CALIB), "--plan-out", str(plan), "--report",
            str(report), "--max-trials", "8"]
    pre, message = "", ""
    if case == "plot without matplotlib":
        pre, message = "sys.modules['matplotlib'] = None; ", "--plot needs matplotlib"
        args += ["--plot", str(tmp_path / "w.png")]
    elif case == "report folder missing":
        args[args.index(str(report))] = str(tmp_path / "nope" / "r.json")
        message = "does not exist"
    elif case == "plan over the output":
        args[args.index(str(plan))] = str(out)
        message = "--plan-out and --output name the same file"
    elif case == "eval data missing":
        args += ["--eval", str(tmp_path / "missing.npz")]
        message = "data source not found"
    else:
        pre, message = "sys.modules['torch'] = None; ", "pip install 'aofp-onnx[torch]'"
        args += ["--finetune-steps", "2", "--data", str(CALIB)]
    code = f"import sys; {pre}from aofp_onnx.cli import main; main({args!r})"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's package, not an installed one
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "trials" not in proc.stderr  # refused before the search
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- 7. readable groups -----------------------------------------------------------------------------------
def test_inspect_names_each_groups_layers_and_explains_macs(tmp_path):
    proc = ok(run_cli("inspect", CNN, "--all", "--json", tmp_path / "i.json"))
    info = json.loads((tmp_path / "i.json").read_text())
    g = {x["id"]: x for x in info["groups"]}
    assert g["/features/features.3/Conv_output_0"]["producers"] == ["Conv /features/features.3/Conv"]
    assert g["/features/features.3/Conv_output_0"]["consumers"] == ["Conv /features/features.7/Conv"]
    assert g["logits"]["consumers"] == [] and g["input"]["producers"] == []
    assert sum(x["macs"] for x in info["groups"]) == 2 * info["macs"] == 37_383_680
    assert "sums to about twice" in info["group_macs"] and "sums to about twice" in proc.stdout
    assert "read by: Conv /features/features.7/Conv" in proc.stdout


def test_widths_plot_labels_groups_by_name(monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    from aofp_onnx import plot

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    monkeypatch.setattr(plot, "write_atomic", lambda path, data: None)
    groups = [{"id": "conv1_out", "width_before": 8, "width_after": 4},
              {"id": "/backbone/stage4/block3/conv2/Conv_output_0", "width_before": 16, "width_after": 8}]
    plot.plot_widths({"groups": groups, "criterion": "aofp", "macs_before": 4, "macs_after": 2}, "unused.png")
    labels = [t.get_text() for t in figures[0].axes[0].get_xticklabels()]
    assert labels == ["conv1_out", "…ck3/conv2/Conv_output_0"]


# --- 8. hygiene -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_honour_the_umask(tmp_path, umask):
    pytest.importorskip("matplotlib")
    names = {"-o": "m.onnx", "--report": "r.json", "--plan-out": "p.json", "--plot": "w.png"}
    args = [a for k, v in names.items() for a in (k, str(tmp_path / v))]
    proc = subprocess.run([sys.executable, "-m", "aofp_onnx", "prune", str(CNN), "--calib", "random:8", "--criterion",
                           "l1", "--flops-target", "0.5", "--no-latency", *args], capture_output=True, text=True,
                          umask=umask, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    modes = {v: stat.S_IMODE(os.stat(tmp_path / v).st_mode) for v in names.values()}
    assert modes == {v: 0o666 & ~umask for v in names.values()}  # 0644 / 0640, as `touch` would give


def test_bench_prints_the_batch_it_ran_and_refuses_a_conflict():
    proc = ok(run_cli("bench", CNN, "--input-shape", "input:4,1,28,28", "--repeats", "3", "--warmup", "1"))
    assert "(batch 4," in proc.stdout.splitlines()[0]
    proc = run_cli("bench", CNN, "--input-shape", "input:4,1,28,28", "--batch-size", "8")
    assert proc.returncode == 2 and "--batch-size 8 and --input-shape input:4,1,28,28 disagree" in proc.stderr


def test_the_dynamic_shape_hint_runs_as_typed(tmp_path):
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "h", "w"])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "d.onnx")
    proc = run_cli("inspect", tmp_path / "d.onnx")
    assert proc.returncode == 2
    hint = proc.stderr.split("pass ")[1].split(" (")[0]
    assert hint == "--input-shape x:1,3,224,224" and "dims 2, 3 are free" in proc.stderr
    ok(run_cli("inspect", tmp_path / "d.onnx", *hint.split()))
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.new("RGB", (5, 5)).save(tmp_path / "imgs" / "a.png")
    proc = run_cli("prune", tmp_path / "d.onnx", "-o", tmp_path / "o.onnx", "--calib", tmp_path / "imgs",
                   "--criterion", "l1", "--flops-target", "0.5")
    assert proc.returncode == 2 and "--image-size HxW" in proc.stderr
