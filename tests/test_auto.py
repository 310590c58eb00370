"""`--criterion auto`, the default: which criterion it runs and why (`criteria.resolve_auto`), the ranking cost it
decides by (`descent.ranking_forwards`), and `prune` end to end."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import zoo
from aofp_onnx import criteria, damage_point, descent
from aofp_onnx.api import Pruner
from aofp_onnx.search_run import calibration_batches, check_batches
from aofp_onnx.trial import TrialEngine, activation_bytes
from cliutil import ok, run_cli

MODELS = pathlib.Path(__file__).resolve().parent.parent / "models"


@pytest.fixture(scope="module")
def mnist():
    return Pruner.load(MODELS / "mnist_cnn.onnx", data=str(MODELS / "mnist_calib.npz"), limit=48, hold_out=True)


def test_auto_runs_the_descent_with_a_target_and_aofp_without_one_or_with_its_options(mnist, monkeypatch):
    assert criteria.resolve_auto(mnist, None, None, []) == {
        "criterion": "aofp", "why": "no target: AOFP's threshold sets each layer's width"}
    chosen = criteria.resolve_auto(mnist, None, 0.6, ["threshold", "damage_at", "finetune_steps"])
    assert chosen == {"criterion": "aofp", "why": "threshold, finetune_steps: read by AOFP's search only"}
    chosen = criteria.resolve_auto(mnist, 0.5, None, ["damage_at"], batch_size=16)
    forwards = descent.ranking_forwards(mnist, 16)
    assert chosen["criterion"] == "descent" and chosen["ranking_forwards"] == round(forwards, 1) <= chosen["limit"]
    monkeypatch.setattr(criteria, "RANKING_LIMIT", int(forwards) - 1)  # a ranking just too long
    chosen = criteria.resolve_auto(mnist, 0.5, None, [], batch_size=16)
    assert chosen["criterion"] == "aofp" and f"(more than {int(forwards) - 1})" in chosen["why"]


def test_the_ranking_cost_counts_the_runs_and_copies_the_ranking_runs(tmp_path, monkeypatch):
    """At the next layers: each stacked run's base forward (one per ⌈W / stack⌉ rows and batch) and every channel's
    consumer copies, in forwards of the model; at the outputs every channel's downstream part, which holds its
    consumers and more."""
    pruner = Pruner.load(zoo.build("vgg", tmp_path).path, data="random:40", hold_out=False)
    cmap = pruner.cmap
    batches = check_batches(calibration_batches(pruner, 8))
    runs = []
    real = TrialEngine.damage
    monkeypatch.setattr(TrialEngine, "damage", lambda self, keep, rows, feeds: runs.append(len(rows)) or
                        real(self, keep, rows, feeds))
    memory = activation_bytes(cmap) * len(next(iter(batches[0].values()))) * 5  # 5 rows per run
    rank, _ = descent.ranking(cmap, "next", "sample", "cpu", memory=memory)
    rank(batches)
    widths = np.array([g.width for g in cmap.prunable])
    assert max(runs) == 5 < widths.max() and sum(runs) == widths.max() * len(batches)
    copies = widths @ np.array(damage_point.sink_macs(cmap)) / cmap.total_macs
    assert descent.ranking_forwards(pruner, 8, memory, "next") == pytest.approx(len(runs) / len(batches) + copies)
    far = np.array(damage_point.downstream_macs(cmap))
    assert (far >= damage_point.sink_macs(cmap)).all() and far[0] > far[-1]  # the first group's part is the longest
    assert descent.ranking_forwards(pruner, 8, None, "output") == pytest.approx(1 + widths @ far / cmap.total_macs)


def test_prune_says_which_criterion_auto_ran(tmp_path):
    args = ("--calib", MODELS / "mnist_calib.npz", "--calib-limit", "64", "--batch-size", "16", "--provider", "cpu",
            "--no-progress", "--no-latency", "--round-to", "8")
    runs = {"target": ("--flops-target", "0.5"), "threshold": ("--flops-target", "0.5", "--threshold", "0.02"),
            "none": ()}
    reports = {}
    for name, extra in runs.items():
        proc = ok(run_cli("prune", MODELS / "mnist_cnn.onnx", "-o", tmp_path / f"{name}.onnx", *args, *extra,
                          "--report", tmp_path / f"{name}.json"))
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
        chosen = reports[name]["criterion_auto"]
        assert f"search  --criterion auto -> {chosen['criterion']}: {chosen['why']}" in proc.stdout
        assert reports[name]["criterion"] == chosen["criterion"] and reports[name]["verification"]["passed"]
    assert reports["target"]["criterion"] == "descent" and reports["target"]["search"]["forwards"] > 0
    assert reports["target"]["macs_after"] <= 0.5 * reports["target"]["macs_before"] * 1.001
    assert reports["threshold"]["criterion"] == "aofp" and "threshold" in reports["threshold"]["criterion_auto"]["why"]
    assert reports["threshold"]["search"]["threshold"] == pytest.approx(0.02)
    assert reports["none"]["criterion"] == "aofp" and reports["none"]["criterion_auto"]["why"].startswith("no target")
    assert not list(tmp_path.glob("*.search-state.npz"))  # AOFP's checkpoints are gone, the descent wrote none
