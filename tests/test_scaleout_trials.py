"""AOFP trials shared between several onnxruntime sessions (`--devices`, aofp_onnx.pool), on CPU sessions.

The pool deals the rows of a round out to its sessions and concatenates their damages; every damage
row depends only on its own trial, so the pooled damages equal one session's bit for bit, and a
search under the same seed makes the same decisions: the same plan and the same channel scores.
(CUDA sessions, `cuda:K`, go through the same code with `device_id` K; no GPU was there to run them.)
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from aofp_onnx import api
from aofp_onnx.errors import InputError
from aofp_onnx.pool import Device, parse_devices
from aofp_onnx.trial import TrialEngine
from cliutil import run_cli

MODELS = pathlib.Path(__file__).resolve().parents[1] / "models"
CNN, CALIB = MODELS / "mnist_cnn.onnx", MODELS / "mnist_calib.npz"


def test_device_lists_parse_and_bad_ones_are_refused_with_the_syntax():
    assert parse_devices("cuda:0,cuda:1") == [Device("cuda", 0), Device("cuda", 1)]
    assert parse_devices("cpu, cpu,cuda") == [Device("cpu"), Device("cpu"), Device("cuda", 0)]
    for bad, says in (("gpu:0", "'gpu:0' is not a device"), ("cpu:2", "'cpu:2' is not a device"),
                      ("cuda:0,,cuda:1", "'' is not a device"), ("cuda:1,cuda:1", "named twice")):
        with pytest.raises(InputError, match=says):
            parse_devices(bad)


def test_pooled_damages_equal_one_session_bit_for_bit():
    pruner = api.Pruner.load(CNN, data=str(CALIB))
    cmap = pruner.cmap
    feeds = next(pruner.data.batches(16))
    rng = np.random.default_rng(0)
    rows = (rng.random((5, cmap.n_slots + 1)) > 0.5).astype(np.float32)  # 5 rows over 3 sessions: 2, 2, 1
    rows[:, -1] = 1
    keep = cmap.full_keep()
    keep[cmap.prunable[0].slots[:3]] = False
    one = TrialEngine(cmap, "cpu").damage(keep, rows, feeds)
    pooled = TrialEngine(cmap, "cpu", devices=parse_devices("cpu,cpu,cpu")).damage(keep, rows, feeds)
    assert one.shape == (5, len(cmap.prunable)) and (one > 0).all()
    np.testing.assert_array_equal(pooled, one)


@pytest.mark.slow  # two searches of 64 trials: about 19 s on the 2 busy cores here
def test_two_sessions_give_the_plan_of_one_under_a_seed(tmp_path):
    common = dict(calib=str(CALIB), flops_target=0.5, provider="cpu", latency=False, max_trials=64, seed=3)
    one = api.prune(CNN, tmp_path / "one.onnx", plan_out=tmp_path / "one.json", **common)
    two = api.prune(CNN, tmp_path / "two.onnx", plan_out=tmp_path / "two.json", devices="cpu,cpu", **common)
    plan_one, plan_two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert plan_two["groups"] == plan_one["groups"]
    groups = plan_one["groups"].values()
    assert sum(len(g["keep"]) for g in groups) < sum(g["width"] for g in groups)  # the search did cut
    assert two["search"]["devices"] == ["cpu", "cpu"] and "devices" not in one["search"]
    assert two["search"]["trials"] == one["search"]["trials"] == 64
    assert two["macs_after"] == one["macs_after"] and two["verification"]["passed"]


@pytest.mark.parametrize("extra, says", [
    (("--devices", "gpu0"), "--devices: 'gpu0' is not a device"),
    (("--devices", "cuda:99"), "--devices cuda:99:"),  # no such GPU (or no CUDA at all)
    (("--devices", "cpu,cpu", "--criterion", "l1"), "use it with --criterion aofp"),
])
def test_bad_devices_exit_2_with_one_line_and_write_nothing(tmp_path, extra, says):
    out = tmp_path / "o.onnx"
    proc = run_cli("prune", CNN, "-o", out, "--calib", CALIB, "--flops-target", "0.5", "--no-progress", *extra)
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()
