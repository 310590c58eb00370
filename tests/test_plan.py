"""Plans: JSON round trip, validation against the model (InputError with a message), defaults."""
from __future__ import annotations

import json

import numpy as np
import pytest

import zoo
from aofp_onnx.api import Pruner
from aofp_onnx.errors import InputError
from aofp_onnx.plan import FORMAT, Plan, keep_from_plan, plan_from_keep


@pytest.fixture(scope="module")
def pruner(tmp_path_factory):
    m = zoo.build("resnet_basic", tmp_path_factory.mktemp("plan_models"))
    return Pruner.load(m.path)


@pytest.fixture(scope="module")
def other_pruner(tmp_path_factory):
    m = zoo.build("vgg", tmp_path_factory.mktemp("plan_other"))
    return Pruner.load(m.path)


def _some_keep(cmap, seed=0):
    """Keep a random non-empty subset in every prunable group."""
    rng = np.random.default_rng(seed)
    keep = cmap.full_keep()
    for g in cmap.prunable:
        mask = rng.random(g.width) < 0.6
        mask[rng.integers(g.width)] = True
        keep[g.slots] = mask
    return keep


def test_plan_json_round_trip(pruner, tmp_path):
    cmap = pruner.cmap
    assert len(cmap.prunable) == 5
    keep = _some_keep(cmap)
    plan = plan_from_keep(cmap, keep, "l1", seed=3, flops_target=0.5)
    path = tmp_path / "plan.json"
    plan.save(path)

    data = json.loads(path.read_text())
    assert data["format"] == FORMAT
    assert data["fingerprint"] == cmap.graph.fingerprint() == plan.fingerprint
    assert data["criterion"] == "l1"
    assert data["meta"] == {"seed": 3, "flops_target": 0.5}
    assert set(data["groups"]) == {g.id for g in cmap.prunable}
    for g in cmap.prunable:
        entry = data["groups"][g.id]
        assert entry["width"] == g.width
        assert entry["keep"] == np.flatnonzero(keep[g.slots]).tolist()
        assert entry["keep"] == sorted(entry["keep"])

    loaded = Plan.load(path)
    assert loaded == plan
    assert loaded.to_json() == plan.to_json()
    back = keep_from_plan(cmap, loaded)
    np.testing.assert_array_equal(back, keep)
    # saved twice: same bytes (reproducible, reviewable)
    plan.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()


def test_full_keep_plan_round_trips_to_full_keep(pruner):
    cmap = pruner.cmap
    plan = plan_from_keep(cmap, cmap.full_keep())
    assert all(plan.keep[g.id] == list(range(g.width)) for g in cmap.prunable)
    assert keep_from_plan(cmap, plan).all()
    assert cmap.macs(keep_from_plan(cmap, plan)) == cmap.total_macs


def test_groups_a_plan_omits_keep_all_channels(pruner):
    cmap = pruner.cmap
    keep = _some_keep(cmap, seed=1)
    plan = plan_from_keep(cmap, keep)
    named = cmap.prunable[1]
    omitted = [g for g in cmap.prunable if g is not named]
    for g in omitted:
        del plan.keep[g.id]
    back = keep_from_plan(cmap, plan)
    np.testing.assert_array_equal(back[named.slots], keep[named.slots])
    assert back[named.slots].sum() < named.width
    for g in omitted:
        assert back[g.slots].all(), g.id
    # an empty plan (no groups at all) is the unpruned model
    plan.keep.clear()
    assert keep_from_plan(cmap, plan).all()


def _plan_with(cmap, gid=None, indices=None):
    plan = plan_from_keep(cmap, cmap.full_keep(), "l1")
    if gid is not None:
        plan.keep[gid] = indices
    return plan


@pytest.mark.parametrize("case,indices,message", [
    ("out_of_range", lambda w: [0, w], r"index \d+ out of range 0\.\.\d+"),
    ("negative", lambda w: [-1, 0], r"index -1 out of range"),
    ("duplicate", lambda w: [0, 1, 1], r"lists a channel index twice"),
    ("empty", lambda w: [], r"keeps no channel"),
])
def test_keep_from_plan_refuses_bad_indices(pruner, case, indices, message):
    cmap = pruner.cmap
    g = cmap.prunable[0]
    plan = _plan_with(cmap, g.id, indices(g.width))
    with pytest.raises(InputError, match=message) as info:
        keep_from_plan(cmap, plan, label="my_plan.json")
    text = str(info.value)
    assert text.startswith("my_plan.json: ")
    assert repr(g.id) in text
    assert "\n" not in text


def test_keep_from_plan_refuses_unknown_group(pruner):
    plan = _plan_with(pruner.cmap, "/no/such/Conv_output_0", [0])
    with pytest.raises(InputError, match=r"group '/no/such/Conv_output_0' does not exist in this model"):
        keep_from_plan(pruner.cmap, plan)


def test_keep_from_plan_refuses_blocked_group(pruner):
    blocked = next(g for g in pruner.cmap.groups if not g.prunable)
    plan = _plan_with(pruner.cmap, blocked.id, [0])
    with pytest.raises(InputError, match="is not prunable") as info:
        keep_from_plan(pruner.cmap, plan)
    assert blocked.reasons[0] in str(info.value)


def test_keep_from_plan_refuses_another_models_plan(pruner, other_pruner):
    plan = plan_from_keep(other_pruner.cmap, other_pruner.cmap.full_keep())
    assert plan.fingerprint != pruner.cmap.graph.fingerprint()
    with pytest.raises(InputError, match=r"made for another model \(fingerprint [0-9a-f]+, this model [0-9a-f]+\)"):
        keep_from_plan(pruner.cmap, plan)
    # a forged fingerprint is refused too
    plan = _plan_with(pruner.cmap)
    plan.fingerprint = "0" * 16
    with pytest.raises(InputError, match="another model"):
        keep_from_plan(pruner.cmap, plan)


@pytest.mark.parametrize("text,message", [
    ("{not json", "not a JSON plan"),
    ("[1, 2, 3]", "not an aofp-onnx plan"),
    (json.dumps({"format": "other/plan@9", "groups": {}}), "not an aofp-onnx plan"),
    (json.dumps({"format": FORMAT, "groups": []}), "not an aofp-onnx plan"),
    (json.dumps({"format": FORMAT, "fingerprint": "x", "groups": {"g": {"keep": "0,1"}}}), "integer 'keep'"),
    (json.dumps({"format": FORMAT, "fingerprint": "x", "groups": {"g": {"keep": [0, 1.5]}}}), "integer 'keep'"),
    (json.dumps({"format": FORMAT, "fingerprint": "x", "groups": {"g": {"keep": [True]}}}), "integer 'keep'"),
    (json.dumps({"format": FORMAT, "fingerprint": "x", "groups": {"g": [0, 1]}}), "integer 'keep'"),
])
def test_plan_load_refuses_malformed_files(tmp_path, text, message):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as info:
        Plan.load(path)
    assert str(path) in str(info.value)


def test_plan_load_refuses_missing_and_binary_files(tmp_path):
    with pytest.raises(InputError, match="no such plan file"):
        Plan.load(tmp_path / "nope.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(InputError, match="not a JSON plan"):
        Plan.load(tmp_path / "bin.json")
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(InputError):
        Plan.load(tmp_path / "folder.json")
