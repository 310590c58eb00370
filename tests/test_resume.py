"""Ctrl-C during an AOFP search leaves no output; `--resume` continues to the identical plan."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from aofp_onnx import search, statefile
from aofp_onnx.api import Pruner
from aofp_onnx.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "resnet20_digits.onnx"
CALIB = ROOT / "models" / "mnist_calib.npz"


def prune_cmd(out: Path, plan: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "aofp_onnx", "prune", str(MODEL), "-o", str(out), "--calib", str(CALIB),
            "--flops-target", "0.5", "--criterion", "aofp", "--seed", "7", "--batch-size", "16", "--calib-limit", "64",
            "--provider", "cpu", "--no-progress", "--plan-out", str(plan), *extra]


def test_sigint_leaves_no_output_and_resume_gives_the_same_plan(tmp_path):
    full_plan = tmp_path / "full.json"
    done = subprocess.run(prune_cmd(tmp_path / "full.onnx", full_plan), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    out, plan, state = tmp_path / "cut.onnx", tmp_path / "cut.json", tmp_path / "state.npz"
    # SIGINT back to its default in the child: a suite started in the background inherits it ignored, and Python
    # then never raises KeyboardInterrupt
    proc = subprocess.Popen(prune_cmd(out, plan, "--checkpoint", str(state)), stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert state.exists(), "the search never checkpointed"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"--resume {state}" in lines[0]
    assert not out.exists() and not plan.exists()
    assert not list(tmp_path.glob(".aofp-*"))  # no temp files left behind
    assert state.exists()

    resumed = subprocess.run(prune_cmd(out, plan, "--checkpoint", str(state), "--resume", str(state)),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(plan.read_text())["groups"] == json.loads(full_plan.read_text())["groups"]
    assert out.exists() and not state.exists()  # the state is removed once the search ends


def fake_damage(cmap, seed=5):
    importance = np.random.default_rng(seed).random(cmap.n_slots) ** 3

    def damage(keep, rows):
        out = np.zeros((len(rows), len(cmap.prunable)))
        for k, g in enumerate(cmap.prunable):
            live = importance[g.slots] * keep[g.slots]
            out[:, k] = [(live * (r[g.slots] == 0)).sum() / live.sum() for r in rows]
        return out

    return damage


def _state_at(cmap, damage, stop_at: int, **options) -> dict:
    """The state file a search with `options` saved before Ctrl-C in round `stop_at` + 1, loaded back."""
    calls = {"n": 0}

    def interrupted(keep, rows):
        calls["n"] += 1
        if calls["n"] > stop_at:
            raise KeyboardInterrupt
        return damage(keep, rows)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.npz"
        with pytest.raises(KeyboardInterrupt):
            search.aofp(cmap, interrupted, checkpoint=lambda s: statefile.save_state(path, s, {"seed": 3}),
                        **options)
        return statefile.load_state(path, {"seed": 3})


# at 0.1 the threshold is first raised after round 455, seven times in all (0.01 -> 0.0477)
@pytest.mark.parametrize("target, stop_at", [(0.5, 1), (0.5, 5), (0.5, 23), (0.1, 456), (0.1, 650)])
def test_resume_from_any_round_matches_the_uninterrupted_search(target, stop_at):
    cmap = Pruner.load(ROOT / "models" / "mnist_cnn.onnx").cmap
    damage = fake_damage(cmap)
    full_keep, full_scores, full = search.aofp(cmap, damage, flops_target=target, seed=3, stack=4)
    assert full.threshold == (0.01 if target == 0.5 else pytest.approx(0.01 * 1.25 ** 7))
    state = _state_at(cmap, damage, stop_at, flops_target=target, seed=3, stack=4)
    assert state["scalars"]["rounds"] == stop_at
    keep, scores, resumed = search.aofp(cmap, damage, flops_target=target, seed=3, stack=4, resume=state)
    assert np.array_equal(keep, full_keep)
    assert np.array_equal(scores, full_scores)
    assert (resumed.trials, resumed.rounds) == (full.trials, full.rounds)


def test_resume_with_output_checks_matches_the_uninterrupted_search():
    """`--accept-by output`: the checked damage of each depth's half is part of the state (the retrace after a
    raise reads it), so a search resumed from a round before and after the raises ends where the whole one
    does."""
    cmap = Pruner.load(ROOT / "models" / "mnist_cnn.onnx").cmap
    damage, v = fake_damage(cmap), np.random.default_rng(7).random(cmap.n_slots + 1) ** 3

    def check(keep, slots):
        return v[slots].sum() / v[keep].sum()

    full_keep, _, full = search.aofp(cmap, damage, threshold=0.001, flops_target=0.2, seed=3, stack=4, check=check)
    assert full.threshold > 0.001 and full.checks > 0  # raised at least once
    for stop_at in (5, full.rounds - 3):
        state = _state_at(cmap, damage, stop_at, threshold=0.001, flops_target=0.2, seed=3, stack=4, check=check)
        keep, _, resumed = search.aofp(cmap, damage, threshold=0.001, flops_target=0.2, seed=3, stack=4,
                                       check=check, resume=state)
        assert np.array_equal(keep, full_keep)
        assert (resumed.trials, resumed.rounds, resumed.checks) == (full.trials, full.rounds, full.checks)


def test_a_state_saved_for_other_options_is_refused(tmp_path):
    cmap = Pruner.load(ROOT / "models" / "mnist_cnn.onnx").cmap
    path = tmp_path / "state.npz"
    search.aofp(cmap, fake_damage(cmap), flops_target=0.9, seed=1, stack=4, max_trials=8,
                checkpoint=lambda s: statefile.save_state(path, s, {"seed": 1, "threshold": 0.01}))
    with pytest.raises(InputError, match="seed differ"):
        statefile.load_state(path, {"seed": 2, "threshold": 0.01})
    (tmp_path / "junk.npz").write_bytes(b"not a state")
    with pytest.raises(InputError, match="not an aofp-onnx search state"):
        statefile.load_state(tmp_path / "junk.npz", {})
    with pytest.raises(InputError, match="no such search state"):
        statefile.load_state(tmp_path / "missing.npz", {})
