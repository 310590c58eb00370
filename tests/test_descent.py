"""The descent criterion (aofp_onnx.descent): its ranking against single ablations run one at a time, its
steps' sizes, its cut against L1's and random's at the same MACs, and `prune --criterion descent` end to end."""
from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import zoo
from aofp_onnx import api, descent, select
from aofp_onnx.api import Pruner
from aofp_onnx.criteria import l1_scores, random_scores
from aofp_onnx.masking import KEEP_INPUT, keep_feed, masked_model
from aofp_onnx.progress import SearchProgress
from aofp_onnx.runtime import Runner
from aofp_onnx.search_run import CutErrors
from aofp_onnx.trial import TrialEngine
from cliutil import ok, run_cli

MODELS = pathlib.Path(__file__).resolve().parent.parent / "models"


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    path = zoo.build("vgg", tmp_path_factory.mktemp("descent_vgg")).path
    p = Pruner.load(path)
    m = zoo.ZooModel("vgg", path, {"input": (1, 3, 32, 32)}, None)
    return p.cmap, [m.feeds(batch=8, seed=0), m.feeds(batch=8, seed=1)]


def test_the_ranking_is_each_channel_removed_alone(vgg):
    """Row i of a stacked run removes channel i of every group at once; each group's damage is read on its own
    consumers, so d_c equals the damage of a trial that removes c and nothing else, averaged over the batches."""
    cmap, batches = vgg
    engine = TrialEngine(cmap, "cpu", damage_at="next", damage_norm="sample")
    keep = cmap.full_keep()
    d, trials = descent.ablations(cmap, engine, keep, batches, stack=5)
    assert trials == max(g.width for g in cmap.prunable) * len(batches)
    rng = np.random.default_rng(0)
    for k, g in enumerate(cmap.prunable):
        live = g.slots[d[g.slots] > 0]  # (a ReLU channel dead on these samples does no damage)
        assert len(live) > g.width // 2
        for c in rng.choice(live, 2, replace=False):
            row = np.ones((1, cmap.n_slots + 1), np.float32)
            row[0, c] = 0.0
            alone = np.mean([engine.damage(keep, row, feeds)[0, k] for feeds in batches])
            np.testing.assert_allclose(d[c], alone, rtol=1e-5)


def test_at_the_outputs_the_ranking_is_each_channel_removed_alone_from_the_model(vgg):
    """d_c = Σ_b Σ‖y − y_c‖² / Σ_b Σ‖y‖², the masked model run whole without c, on every batch."""
    cmap, batches = vgg
    rank, _ = descent.ranking(cmap, "output", "sample", "cpu")
    d, trials = rank(batches)
    assert trials == cmap.n_slots * len(batches)
    runner = Runner(masked_model(cmap), "cpu")
    full = cmap.full_keep()
    for c in np.random.default_rng(0).choice(np.flatnonzero(d[:cmap.n_slots] > 0), 3, replace=False):
        keep = full.copy()
        keep[c] = False
        num = den = 0.0
        for feeds in batches:
            (y,), (y_c,) = (runner.run({**feeds, KEEP_INPUT: keep_feed(k)}) for k in (full, keep))
            num += np.sum((y.astype(np.float64) - y_c) ** 2)
            den += np.sum(y.astype(np.float64) ** 2)
        np.testing.assert_allclose(d[c], num / den, rtol=1e-4)


def test_a_step_down_removes_a_share_of_the_width(vgg):
    """With stride s and step q, a group of width w gives up max(q, q·round(w·s/q)) channels per step down."""
    cmap, _ = vgg
    calls = []

    def damage(keeps):
        calls.append(keeps)
        return np.arange(len(keeps), dtype=float)  # the first group's step adds the least error per MAC

    scores = np.random.default_rng(0).random(cmap.n_slots)
    descent.lower(cmap, cmap.full_keep(), scores, 0.99, 8, 1, None, damage)
    first = calls[0]
    removed = [int((~k[:-1]).sum()) for k in first[1:]]
    assert min(g.width for g in cmap.prunable) >= 16 and max(g.width for g in cmap.prunable) >= 64
    assert removed == [max(8, 8 * round(g.width / 8 / 8)) for g in cmap.prunable]


def test_the_lazy_descent_takes_the_steps_a_full_valuation_would_where_values_do_not_move(vgg, monkeypatch):
    """An additive output error (each channel's removal adds its own weight) leaves every step's value as it
    was: reusing values between full valuations takes the same steps, for fewer forwards."""
    cmap, _ = vgg
    weight = np.random.default_rng(1).random(cmap.n_slots + 1)
    scores = np.random.default_rng(2).random(cmap.n_slots)

    def run(refresh):
        monkeypatch.setattr(descent, "REFRESH", refresh)
        seen = set()

        def damage(keeps):
            seen.update(k.tobytes() for k in keeps)
            return np.array([float(weight[~k].sum()) for k in keeps])
        return descent.lower(cmap, cmap.full_keep(), scores, 0.5, 4, 1, None, damage), len(seen)

    shipped = descent.REFRESH
    (full, full_runs), (lazy, lazy_runs) = run(1), run(shipped)
    assert np.array_equal(full, lazy) and cmap.macs(lazy) <= 0.5 * cmap.total_macs
    assert lazy_runs < full_runs  # few groups here: 28 against 34


def test_the_descent_cut_errs_less_than_l1_and_random_at_the_same_macs(vgg):
    cmap, batches = vgg
    rank, _ = descent.ranking(cmap, "next", "sample", "cpu")
    errors = CutErrors(cmap, batches, "cpu")
    keep, scores, info = descent.descend(cmap, rank, batches, target=0.6, step=1, errors=errors)
    assert cmap.macs(keep) <= 0.6 * cmap.total_macs
    assert info["forwards"] == errors.checks > len(cmap.prunable)
    measure = CutErrors(cmap, batches, "cpu")
    ours = measure([cmap.full_keep(), keep])[1]
    for other in (l1_scores(cmap), random_scores(cmap, 0)):
        theirs = measure([cmap.full_keep(), select.select_by_score(cmap, other, 0.6)])[1]
        assert ours < theirs


def test_the_descent_says_how_far_its_ranking_and_its_steps_are(vgg, capsys):
    """Status lines on stderr (as AOFP's): the ranking's single ablations run of all, then the steps' forwards and MACs
    against the target; each phase's last state is written when it ends."""
    cmap, batches = vgg
    rank, _ = descent.ranking(cmap, "next", "sample", "cpu")
    descent.descend(cmap, rank, batches, target=0.6, step=1, errors=CutErrors(cmap, batches, "cpu"), progress=True)
    lines = capsys.readouterr().err.splitlines()
    total = sum(g.width for g in cmap.prunable) * len(batches)
    ranked = [line for line in lines if "single ablations" in line]
    assert ranked and ranked[-1].startswith(f"descent: {total} of {total} single ablations, ")
    steps = [re.match(r"descent: (\d+) forwards, MACs x([\d.]+) \(target x0.600\), \d+/(\d+) groups narrowing",
                      line) for line in lines if "forwards" in line]
    assert steps and all(steps) and int(steps[-1][3]) == len(cmap.prunable)
    assert float(steps[-1][2]) <= 0.6 < float(steps[0][2]) and int(steps[-1][1]) > int(steps[0][1])
    seen = []  # the ranking's share of its work (base forwards and consumer copies, in MACs): up to 1
    descent.ablations(cmap, TrialEngine(cmap, "cpu"), cmap.full_keep(), batches, 3, lambda n, share: seen.append(share))
    assert seen == sorted(seen) and 0 < seen[0] and seen[-1] == pytest.approx(1.0)
    assert SearchProgress("descent", None, max_trials=100).eta({}, 90, 30.0, share=0.5) == pytest.approx(30.0)
    with descent._status(True, "of 1000 single ablations", 1000) as show:  # one per run (a memory budget)
        for done in range(1, 1001):
            show(done, None, 0, 0)
    lines = capsys.readouterr().err.splitlines()  # in a log: at each tenth, not at every run
    assert [int(line.split()[1]) for line in lines] == [1] + list(range(100, 1001, 100))


def test_prune_descent_end_to_end(tmp_path):
    out, rep_path = tmp_path / "pruned.onnx", tmp_path / "report.json"
    args = ("--calib", MODELS / "mnist_calib.npz", "--calib-limit", "64", "--batch-size", "16", "--provider", "cpu",
            "--no-progress", "--round-to", "8", "--eval", MODELS / "mnist_test.npz")
    ok(run_cli("prune", MODELS / "mnist_cnn.onnx", "-o", out, *args, "--criterion", "descent", "--flops-target", "0.5",
               "--report", rep_path))
    rep = json.loads(rep_path.read_text())
    assert rep["criterion"] == "descent" and rep["verification"]["passed"]
    assert rep["macs_after"] <= 0.5 * rep["macs_before"] * 1.001
    search = rep["search"]
    assert search["forwards"] > 0 and 0 < search["ranking_seconds"] <= search["seconds"]
    assert search["damage_at"] in ("next", "output") and search["stride"] == descent.STRIDE
    assert rep["round_to"]["latency_weighted"] is False
    assert all(g["width_after"] % 8 == 0 or g["width_after"] == g["width_before"] for g in rep["groups"])
    ok(run_cli("prune", MODELS / "mnist_cnn.onnx", "-o", tmp_path / "l1.onnx", *args, "--criterion", "l1",
               "--flops-target", "0.5", "--report", tmp_path / "l1.json"))
    assert rep["accuracy"]["after"] >= json.loads((tmp_path / "l1.json").read_text())["accuracy"]["after"]


def test_descent_needs_a_target(tmp_path):
    proc = run_cli("prune", MODELS / "mnist_cnn.onnx", "-o", tmp_path / "x.onnx", "--calib",
                   MODELS / "mnist_calib.npz", "--criterion", "descent", "--no-progress")
    assert proc.returncode == 2 and "--criterion descent needs --flops-target" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.onnx").exists()


def test_a_model_with_nothing_to_prune_is_written_whole(tmp_path):
    """Every group blocked (the conv's channels are a graph output): the descent keeps everything, as L1 does, and
    `auto` has no ranking to cost."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g", [x], [y], [w])
    src = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), src)
    reports = {c: api.prune(src, tmp_path / f"{c}.onnx", calib="random:4", criterion=c, flops_target=0.5,
                            latency=False) for c in ("descent", "l1", "auto")}
    for rep in reports.values():
        assert rep["verification"]["passed"] and rep["macs_after"] == rep["macs_before"]
    assert reports["descent"]["search"]["trials"] == 0
    assert reports["auto"]["criterion_auto"]["ranking_forwards"] == 0 and reports["auto"]["criterion"] == "descent"
