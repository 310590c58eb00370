"""AOFP's binary search (aofp_onnx.search.aofp) against a fake damage with known answers, the exact
oracle against a direct computation, and `prune --criterion aofp` end to end on the shipped model.

The fake damage: every channel c has a "true importance" u_c; a trial removing R_g from group g (kept
set K_g) does t_g = Σ_{c∈R_g} u_c / Σ_{c∈K_g} u_c, the relative damage AOFP measures. Channels with
u = 1e-4 are unimportant, u = 1 important; the threshold is 0.01.

Hand-derived search on a group of 8 with 4 unimportant channels U (S = search space, granu = ⌊|S|/2⌋;
"any trial hurts" = every random half of S holds an important channel, so its damage is ≥ 1/4 ≫ 0.01):

    decision  K   |S|  granu  what happens
    1         8   8    4      a half of 8 always holds an important channel → S := 4 best (= U)
    2         8   4    2      S = U: damage 2e-4/4 ≈ 5e-5 < 0.01 → prune 2 of U, restart on K
    3         6   6    3      3 of 6 with only 2 unimportant → any trial hurts → S := 3 best (2 U + 1)
    4         6   3    1      a lone unimportant channel: 2.5e-5 < 0.01 → prune it, restart
    5         5   5    2      2 of 5 with 1 unimportant → any trial hurts → S := 2 best (U + 1)
    6         5   2    1      prune the last unimportant channel, restart
    7         4   4    2      all important: damage 1/2 → S := 2
    8         4   2    1      damage 1/4, granu 1 → saturated

so 8 decisions, and |S| at each is 8, 4, 6, 3, 5, 2, 4, 2. A group of 16 important channels never
prunes: |S| = 16, 8, 4, 2 (damages 1/2, 1/4, 1/8, 1/16), 4 decisions, saturated. Groups search at once,
so with `stack ≥ trials_per_half` a run makes max(8, 4) = 8 damage calls of `trials_per_half` rows.
(The ranking at decisions 1, 3, 5 is statistical; with 64 trials per half it is right for each of seeds
0-99, here and for the one-in-sixteen case below; seed 0 is fixed here.)
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import zoo
from aofp_onnx import check, oracle, search, search_run
from aofp_onnx.api import Pruner
from aofp_onnx.errors import InputError
from aofp_onnx.masking import KEEP_INPUT, keep_feed, masked_model
from aofp_onnx.runtime import Runner, resolve_provider

REPO = pathlib.Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
UNIMPORTANT = 1e-4
TPH = 64  # trials per half for the hand-derived counts


# --- a tiny model with two prunable groups: Conv(2→8) → ReLU → Conv(8→16) → ReLU → Conv(16→4) -----------
def _tiny_model(path: pathlib.Path, widths=(8, 16)) -> pathlib.Path:
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    x, cin = "input", 2
    for k, w in enumerate([*widths, 4]):
        inits += [numpy_helper.from_array(rng.normal(size=(w, cin, 3, 3)).astype(np.float32), f"w{k}"),
                  numpy_helper.from_array(rng.normal(size=(w,)).astype(np.float32), f"b{k}")]
        nodes.append(helper.make_node("Conv", [x, f"w{k}", f"b{k}"], [f"conv{k}"], pads=[1, 1, 1, 1], name=f"conv{k}"))
        x, cin = f"conv{k}", w
        if k < len(widths):
            nodes.append(helper.make_node("Relu", [x], [f"relu{k}"], name=f"relu{k}"))
            x = f"relu{k}"
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 8, 8])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


@pytest.fixture(scope="module")
def cmap(tmp_path_factory):
    cm = Pruner.load(_tiny_model(tmp_path_factory.mktemp("search_tiny") / "tiny.onnx")).cmap
    assert [g.width for g in cm.prunable] == [8, 16] and cm.n_slots == 24
    return cm


class FakeDamage:
    """damage(keep, rows) = Σ_R u / Σ_K u per group; records every call."""

    def __init__(self, cm, u: np.ndarray):
        self.cm, self.u, self.calls = cm, u, []

    def __call__(self, keep: np.ndarray, rows: np.ndarray) -> np.ndarray:
        self.calls.append((keep.copy(), rows.copy()))
        out = np.zeros((len(rows), len(self.cm.prunable)))
        for k, g in enumerate(self.cm.prunable):
            kept = keep[g.slots]
            removed = kept[None, :] & (rows[:, g.slots] == 0)
            out[:, k] = removed @ self.u[g.slots] / self.u[g.slots][kept].sum()
        return out

    @property
    def rows(self) -> int:
        return sum(len(r) for _, r in self.calls)


def _importance(cm, unimportant) -> np.ndarray:
    u = np.ones(cm.n_slots + 1)
    u[list(unimportant)] = UNIMPORTANT
    return u


def _removed(keep: np.ndarray) -> set[int]:
    return set(np.flatnonzero(~keep[:-1]).tolist())


@pytest.fixture
def decisions(monkeypatch):
    """Per group width: the size of the search space at each halving decision."""
    seen: dict[int, list[int]] = {}
    original = search._decide

    def spy(g, *args, **kwargs):
        seen.setdefault(len(g.slots), []).append(len(g.space))
        return original(g, *args, **kwargs)

    monkeypatch.setattr(search, "_decide", spy)
    return seen


# --- the state machine against the fake -----------------------------------------------------------------
def test_destructive_search_removes_exactly_the_unimportant_channels(cmap, decisions):
    unimportant = {0, 2, 5, 7}  # half of the 8-wide group; the 16-wide group is all important
    fake = FakeDamage(cmap, _importance(cmap, unimportant))
    keep, scores, stats = search.aofp(cmap, fake, threshold=0.01, trials_per_half=TPH, flops_target=None,
                                      seed=0, stack=TPH)
    assert _removed(keep) == unimportant
    assert keep[-1]
    # the binary search as derived in the module docstring
    assert decisions == {8: [8, 4, 6, 3, 5, 2, 4, 2], 16: [16, 8, 4, 2]}
    assert len(fake.calls) == stats.rounds == 8
    assert fake.rows == stats.trials == 8 * TPH
    assert all(len(rows) == TPH for _, rows in fake.calls)
    # every call saw the keep state of that moment: 8, 8, 6, 6, 5, 5, 4, 4 channels in the first group
    assert [int(k[:8].sum()) for k, _ in fake.calls] == [8, 8, 6, 6, 5, 5, 4, 4]
    assert all(k[8:].all() for k, _ in fake.calls)
    # trials remove half of the search space of each active group, never a removed channel
    for k, rows in fake.calls:
        assert np.all(rows[:, -1] == 1)
        assert np.all(rows[:, :-1][:, ~k[:-1]] == 1)
    first = fake.calls[0][1]
    assert np.all((first[:, :8] == 0).sum(axis=1) == 4) and np.all((first[:, 8:24] == 0).sum(axis=1) == 8)
    # the first-half damage is the per-slot mean of the first decision: all measured, all in [0, 1]
    assert stats.first_half_damage.shape == (cmap.n_slots,)
    assert np.all((stats.first_half_damage >= 0) & (stats.first_half_damage <= 1))
    assert stats.first_half_damage[sorted(unimportant)].max() < np.delete(stats.first_half_damage[:8],
                                                                          sorted(unimportant)).min()
    assert stats.threshold == 0.01 and stats.seconds >= 0
    assert scores.shape == (cmap.n_slots,)


def test_stack_splits_a_half_into_several_calls(cmap, decisions):
    fake = FakeDamage(cmap, _importance(cmap, {0, 2, 5, 7}))
    keep, _, stats = search.aofp(cmap, fake, threshold=0.01, trials_per_half=TPH, seed=0, stack=16)
    assert _removed(keep) == {0, 2, 5, 7}
    assert decisions[8] == [8, 4, 6, 3, 5, 2, 4, 2]
    assert len(fake.calls) == stats.rounds == 8 * TPH // 16
    assert fake.rows == stats.trials == 8 * TPH


def test_group_without_unimportant_channels_saturates_without_pruning(cmap, decisions):
    fake = FakeDamage(cmap, _importance(cmap, []))
    keep, _, stats = search.aofp(cmap, fake, threshold=0.01, trials_per_half=8, seed=0, stack=8)
    assert keep.all()
    # damages |S|/2 / |K| = 1/2, 1/4, 1/8 (1/16) never pass 0.01: pure halving down to one channel
    assert decisions == {8: [8, 4, 2], 16: [16, 8, 4, 2]}
    assert len(fake.calls) == 4 and stats.trials == 32


def test_one_unimportant_channel_in_sixteen(cmap, decisions):
    """16 → 8 → 4 → 2 → 1 finds it (|S| = 16, 8, 4, 2, granu 1 prunes), then 15 important: 15, 7, 3 (sat.)."""
    fake = FakeDamage(cmap, _importance(cmap, {8 + 11}))
    keep, _, stats = search.aofp(cmap, fake, threshold=0.01, trials_per_half=TPH, seed=0, stack=TPH)
    assert _removed(keep) == {19}
    assert decisions[16] == [16, 8, 4, 2, 15, 7, 3]
    assert decisions[8] == [8, 4, 2]
    assert stats.rounds == 7


def test_min_channels_is_respected(cmap, decisions):
    # 6 of 8 unimportant, but at least 6 channels must stay: only 2 go, and only unimportant ones
    unimportant = {0, 1, 2, 3, 4, 5}
    fake = FakeDamage(cmap, _importance(cmap, unimportant | set(range(8, 20))))
    keep, _, _ = search.aofp(cmap, fake, threshold=0.01, trials_per_half=TPH, seed=0, stack=TPH, min_channels=6)
    for g in cmap.prunable:
        assert keep[g.slots].sum() >= 6
    assert int(keep[:8].sum()) == 6 and _removed(keep) & set(range(8)) <= unimportant
    assert int(keep[8:24].sum()) >= 6 and _removed(keep) & set(range(8, 24)) <= set(range(8, 20))
    # without the floor every unimportant channel of the first group goes
    free, _, _ = search.aofp(cmap, FakeDamage(cmap, fake.u), threshold=0.01, trials_per_half=TPH, seed=0, stack=TPH)
    assert _removed(free) & set(range(8)) == unimportant


# --- --accept-by output: a check of each candidate half replaces the estimate's test ----------------------
class FakeCheck:
    """check(keep, slots) = Σ v over the channels the cut with the half removes / Σ v over all (an importance v
    at the outputs, against the original); records the keep vector of each call and its answer."""

    def __init__(self, cm, v: np.ndarray):
        self.cm, self.v, self.calls = cm, v, []

    def __call__(self, keep: np.ndarray, slots: np.ndarray) -> float:
        cut = ~keep[:-1]
        cut[slots] = True
        damage = self.v[:-1][cut].sum() / self.v[:-1].sum()
        self.calls.append((keep.copy(), np.array(slots), damage))
        return damage


def test_accept_by_output_prunes_by_the_check_and_ranks_by_the_trials(cmap):
    """The trials call half of the first group harmless and the second group all important; the check says
    the opposite (the second group is 1e-4 of the output energy): the check decides, each check of the cut
    with the prunes decided before it, and within the second group the trials' ranking picks the halves."""
    fake = FakeDamage(cmap, _importance(cmap, {0, 2, 5, 7}))
    check = FakeCheck(cmap, _importance(cmap, range(8, 24)))
    keep, _, stats = search.aofp(cmap, fake, threshold=0.01, trials_per_half=TPH, seed=0, stack=TPH, check=check)
    assert keep[:8].all() and int(keep[8:24].sum()) == 1  # refused halves; the floor
    assert stats.checks == len(check.calls) > 0
    for (before, slots, damage), (after, _, _) in zip(check.calls, check.calls[1:]):
        assert not after[slots].any() if damage < 0.01 else np.array_equal(after, before)
    # the same trials with the estimate's test prune exactly the harmless half of the first group
    keep, _, stats = search.aofp(cmap, FakeDamage(cmap, fake.u), threshold=0.01, trials_per_half=TPH, seed=0,
                                 stack=TPH)
    assert _removed(keep) == {0, 2, 5, 7} and stats.checks == 0


def _one_channel_back_exceeds(cm, keep, goal) -> bool:
    """The trim: some removed channel, put back, takes the model above the goal again."""
    for c in np.flatnonzero(~keep[:-1]):
        back = keep.copy()
        back[c] = True
        if cm.macs(back) > goal:
            return True
    return False


@pytest.mark.parametrize("target", [0.9, 0.75, 0.6])
def test_flops_target_is_met_and_trimmed(cmap, target):
    unimportant = {0, 2, 5, 7} | set(range(8, 16))
    fake = FakeDamage(cmap, _importance(cmap, unimportant))
    keep, _, stats = search.aofp(cmap, fake, threshold=0.01, trials_per_half=16, flops_target=target, seed=0,
                                 stack=16)
    goal = target * cmap.total_macs
    assert cmap.macs(keep) <= goal
    assert _one_channel_back_exceeds(cmap, keep, goal)
    # the target is reachable with unimportant channels only: the threshold never loosened
    assert stats.threshold == 0.01 and _removed(keep) <= unimportant


def test_unreachable_threshold_loosens_until_the_target_holds(cmap):
    fake = FakeDamage(cmap, _importance(cmap, [3]))
    keep, _, stats = search.aofp(cmap, fake, threshold=0.01, trials_per_half=8, flops_target=0.3, seed=0, stack=8)
    goal = 0.3 * cmap.total_macs
    assert cmap.macs(keep) <= goal and _one_channel_back_exceeds(cmap, keep, goal)
    assert stats.threshold > 0.01  # raised at least once
    assert 3 not in np.flatnonzero(keep)


def test_a_raised_threshold_retraces_the_recorded_search(cmap):
    """All channels equal: a half of |S| removed from K costs |S|/2 / |K| in every trial, so the first search
    saturates both groups (8: |S| = 8, 4, 2; 16: 16, 8, 4, 2; 4 rounds, 32 trials) with the 16-wide group's
    last depth at 1/16. Raised by 1.25 each time, the threshold first passes a recorded depth at
    0.01·1.25⁹ ≈ 0.075 > 1/16: the 8 raises before cost no trial, and the next round searches the 16-wide
    group again from its whole kept set; the 8-wide group (its last depth at 1/8) waits for 1.25¹²."""
    assert search.THRESHOLD_GROWTH == 1.25
    fake = FakeDamage(cmap, _importance(cmap, []))
    seen = []
    keep, _, stats = search.aofp(cmap, fake, threshold=0.01, trials_per_half=8, flops_target=0.8, seed=0, stack=8,
                                 progress=lambda st, *_: seen.append((st.trials, st.threshold)))
    assert seen[:4] == [(8, 0.01), (16, 0.01), (24, 0.01), (32, 0.01)]
    assert seen[4] == (40, pytest.approx(0.01 * 1.25 ** 9))
    rows = fake.calls[4][1]
    assert len(rows) == 8 and rows[:, :8].all()  # the 8-wide group stays saturated
    assert (rows[:, 8:24] == 0).sum(axis=1).tolist() == [8] * 8  # fresh halves of the 16 kept channels
    assert cmap.macs(keep) <= 0.8 * cmap.total_macs


def test_max_trials_stops_the_search(cmap):
    fake = FakeDamage(cmap, _importance(cmap, {0, 2, 5, 7}))
    _, _, stats = search.aofp(cmap, fake, threshold=0.01, trials_per_half=8, seed=0, stack=8, max_trials=20)
    assert stats.trials == fake.rows == 20
    assert [len(r) for _, r in fake.calls] == [8, 8, 4]
    _, _, stats = search.aofp(cmap, FakeDamage(cmap, fake.u), threshold=0.01, trials_per_half=8, seed=0, stack=8,
                              max_trials=1)
    assert stats.trials == 1


def test_same_seed_same_result_other_seed_other_trials(cmap):
    u = _importance(cmap, {1, 3, 6} | set(range(8, 14)))
    u[8:24] *= np.linspace(0.5, 2.0, 16)  # unequal important channels

    def go(seed):
        fake = FakeDamage(cmap, u)
        keep, scores, stats = search.aofp(cmap, fake, threshold=0.01, trials_per_half=8, flops_target=0.5,
                                          seed=seed, stack=8)
        return keep, scores, stats, fake

    a, b, c = go(7), go(7), go(8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2].trials == b[2].trials
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a[3].calls, b[3].calls))
    # another seed draws other trials
    assert not np.array_equal(a[3].calls[0][1], c[3].calls[0][1])


# --- search_run.run: refusals ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vgg_path(tmp_path_factory):
    return zoo.build("vgg", tmp_path_factory.mktemp("search_vgg")).path


@pytest.mark.parametrize("criterion", ["aofp", "oracle"])
def test_run_refuses_without_data(vgg_path, criterion):
    with pytest.raises(InputError, match="calibration data"):
        search_run.run(Pruner.load(vgg_path), criterion, flops_target=0.5)


def test_run_refuses_oracle_without_target(vgg_path):
    with pytest.raises(InputError, match="flops-target"):
        search_run.run(Pruner.load(vgg_path, data="random:4"), "oracle", flops_target=None)


def test_cli_threshold_defaults_are_the_search_defaults():
    """The CLI's help spells the default thresholds out (it does not import search at start-up): the same
    values as search_run.run's, which resolves the CLI's None by --accept-by."""
    from aofp_onnx import cli

    option = next(p for p in cli.cli.commands["prune"].params if p.name == "threshold")
    assert option.default is None
    assert (search.DEFAULT_THRESHOLD, search.OUTPUT_THRESHOLD) == (0.01, 0.001)
    assert "[default: 0.01; 0.001 when halves are accepted by the output error]" in option.help
    accept = next(p for p in cli.cli.commands["prune"].params if p.name == "accept_by")
    assert tuple(accept.type.choices) == search.ACCEPT_BY


def test_run_aofp_on_onnxruntime_meets_the_target(vgg_path):
    p = Pruner.load(vgg_path, data="random:16")
    keep, scores, info = search_run.run(p, "aofp", flops_target=0.7, trials_per_half=4, batch_size=8, provider="cpu")
    assert p.cmap.macs(keep) <= 0.7 * p.cmap.total_macs
    assert info["trials"] > 0 and info["provider"] == "CPUExecutionProvider" and "target_reached" not in info
    assert scores.shape == (p.cmap.n_slots,)


def test_run_accept_by_output_checks_halves_at_the_outputs(vgg_path):
    """`accept_by="output"`: the threshold defaults to OUTPUT_THRESHOLD, each candidate half is checked at the
    outputs (counted and reported), the target is met; an unknown value is refused."""
    p = Pruner.load(vgg_path, data="random:16")
    keep, _, info = search_run.run(p, "aofp", flops_target=0.7, trials_per_half=4, batch_size=8, provider="cpu",
                                   accept_by="output")
    assert p.cmap.macs(keep) <= 0.7 * p.cmap.total_macs and "target_reached" not in info
    assert info["accept_by"] == "output" and info["checks"] > 0 and info["threshold"] >= search.OUTPUT_THRESHOLD
    with pytest.raises(InputError, match="--accept-by must be one of auto, estimate, output"):
        search_run.run(p, "aofp", flops_target=0.7, accept_by="exact")


def test_every_output_check_runs_on_the_same_leading_samples(vgg_path, monkeypatch):
    """The output checks of a search all run on the leading batches up to CHECK_SAMPLES samples, whichever
    batch the round's trials drew (checked on the round's batch, a short batch drove the cut alone)."""
    seen = []
    measure = check.OutputCheck.__call__

    def recording(self, batches, keep, slots):
        seen.append([len(b["input"]) for b in batches])
        return measure(self, batches, keep, slots)

    monkeypatch.setattr(check.OutputCheck, "__call__", recording)
    p = Pruner.load(vgg_path, data="random:11")
    search_run.run(p, "aofp", flops_target=0.5, trials_per_half=4, batch_size=8, provider="cpu", accept_by="output")
    assert len(seen) > 2 and all(sizes == [8, 3] for sizes in seen)
    sizes = [8, 8, 8, 3]
    batches = [{"input": np.zeros((n, 1))} for n in sizes]
    assert [len(b["input"]) for b in search_run.check_batches(batches, 20)] == [8, 8]
    assert [len(b["input"]) for b in search_run.check_batches(batches, 4)] == [8]  # one batch at least
    assert search_run.check_batches(batches, 64) == batches


@pytest.mark.parametrize("damage_at, accepted", [("next", "output"), ("block", "output"), ("output", "estimate")])
def test_accept_by_auto_checks_at_the_outputs_where_the_trials_read_before_them(vgg_path, damage_at, accepted):
    """`auto`: halves checked at the outputs where the trials read the next layers or a block of a classifier,
    by the trials' estimate where they read the outputs; the threshold defaults with it."""
    p = Pruner.load(vgg_path, data="random:16")
    _, _, info = search_run.run(p, "aofp", flops_target=0.8, trials_per_half=4, batch_size=8, provider="cpu",
                                damage_at=damage_at, accept_by="auto")
    assert info["accept_by"] == accepted and (info.get("checks", 0) > 0) == (accepted == "output")
    assert info["threshold"] >= (search.OUTPUT_THRESHOLD if accepted == "output" else search.DEFAULT_THRESHOLD)


# --- the exact oracle ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vgg_oracle(vgg_path):
    p = Pruner.load(vgg_path)
    m = zoo.ZooModel("vgg", vgg_path, {"input": (1, 3, 32, 32)}, None)
    feeds = m.feeds(batch=4, seed=0)
    runner = Runner(masked_model(p.cmap), "cpu")
    keep, scores, stats = oracle.oracle(p.cmap, runner, [feeds], flops_target=0.8, oracle_step=24, stack=32)
    return p, feeds, keep, scores, stats


def test_oracle_meets_the_target(vgg_oracle):
    p, _, keep, scores, stats = vgg_oracle
    cm = p.cmap
    assert cm.macs(keep) <= 0.8 * cm.total_macs
    assert stats.rounds >= 1 and stats.trials >= cm.n_slots
    assert np.all(stats.first_half_damage >= 0) and stats.first_half_damage.shape == (cm.n_slots,)
    assert np.all(scores[~keep[:-1]] < search.UNMEASURED)
    for g in cm.prunable:
        assert keep[g.slots].sum() >= 1


def test_oracle_run_to_a_deeper_target_passes_through_the_milder_run(vgg_oracle, vgg_path):
    """The oracle is greedy: `passing` records, on the way to 0.6, exactly the keep of the run to 0.8."""
    p, feeds, keep_08, _, _ = vgg_oracle
    runner = Runner(masked_model(p.cmap), "cpu")
    passing = {0.8: None, 0.7: None}
    keep_06, _, _ = oracle.oracle(p.cmap, runner, [feeds], flops_target=0.6, oracle_step=24, stack=32,
                                  passing=passing)
    assert np.array_equal(passing[0.8][0], keep_08) and passing[0.8][1] >= 0
    assert p.cmap.macs(passing[0.7][0]) <= 0.7 * p.cmap.total_macs < p.cmap.macs(keep_08)
    assert p.cmap.macs(keep_06) <= 0.6 * p.cmap.total_macs


def test_oracle_single_channel_damage_equals_direct_computation(vgg_oracle):
    """first_half_damage[c] = Σ(y − y_c)² / Σ y² over the outputs of the masked model, c alone removed."""
    p, feeds, _, _, stats = vgg_oracle
    cm = p.cmap
    sess = ort.InferenceSession(masked_model(cm).materialize().SerializeToString(),
                                providers=["CPUExecutionProvider"])
    base = sess.run(None, {**feeds, KEEP_INPUT: keep_feed(cm.full_keep())})
    rng = np.random.default_rng(0)
    live = np.flatnonzero(stats.first_half_damage > 0)  # (a ReLU channel dead on these samples does no damage)
    dead = np.flatnonzero(stats.first_half_damage == 0)
    assert len(live) > cm.n_slots // 2
    for c in [*rng.choice(live, 3, replace=False), *dead[:1]]:
        keep = cm.full_keep()
        keep[c] = False
        ablated = sess.run(None, {**feeds, KEEP_INPUT: keep_feed(keep)})
        num = sum(np.sum((y.astype(np.float64) - yc) ** 2) for y, yc in zip(base, ablated))
        den = sum(np.sum(y.astype(np.float64) ** 2) for y in base)
        assert (num > 0) == (c in live)
        np.testing.assert_allclose(stats.first_half_damage[c], num / den, rtol=1e-3, atol=1e-12)


def test_output_check_measures_the_cut_with_the_half_against_the_original(vgg_oracle):
    """OutputCheck(keep, R) = Σ_o Σ(y_o − y_o,K∖R)² / Σ y_o², y the original outputs, computed directly."""
    p, feeds, _, _, _ = vgg_oracle
    cm = p.cmap
    runner = Runner(masked_model(cm), "cpu")
    measure = check.OutputCheck(runner)
    rng = np.random.default_rng(1)
    keep = cm.full_keep()
    keep[rng.choice(cm.n_slots, cm.n_slots // 4, replace=False)] = False
    half = rng.choice(np.flatnonzero(keep[:-1]), 8, replace=False)
    cut = keep.copy()
    cut[half] = False
    (y,), (y_cut,) = (runner.run({**feeds, KEEP_INPUT: keep_feed(k)}) for k in (cm.full_keep(), cut))
    direct = np.sum((y.astype(np.float64) - y_cut) ** 2) / np.sum(y.astype(np.float64) ** 2)
    assert direct > 1e-6
    np.testing.assert_allclose(measure([feeds], keep, half), direct, rtol=1e-6)
    np.testing.assert_allclose(measure([feeds], cut, []), direct, rtol=1e-6)  # the same cut, reached otherwise


# --- end to end through the CLI ------------------------------------------------------------------------
def _cli(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "aofp_onnx", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc


SHORT = ("--calib", MODELS / "mnist_calib.npz", "--calib-limit", "64", "--batch-size", "16",
         "--trials-per-half", "4", "--provider", "cpu", "--no-progress")


def test_prune_aofp_plan_is_reproducible(tmp_path):
    plans = []
    for k in range(2):
        _cli("prune", MODELS / "mnist_cnn.onnx", "-o", tmp_path / f"out{k}.onnx", *SHORT, "--criterion", "aofp",
             "--flops-target", "0.6", "--seed", "3", "--plan-out", tmp_path / f"plan{k}.json")
        plans.append((tmp_path / f"plan{k}.json").read_bytes())
    assert plans[0] == plans[1]
    plan = json.loads(plans[0])
    assert plan["criterion"] == "aofp" and plan["meta"]["seed"] == 3
    assert any(len(v["keep"]) < v["width"] for v in plan["groups"].values())


def test_prune_aofp_end_to_end_on_the_shipped_model(tmp_path):
    out, rep_path = tmp_path / "pruned.onnx", tmp_path / "report.json"
    _cli("prune", MODELS / "mnist_cnn.onnx", "-o", out, *SHORT, "--criterion", "aofp", "--flops-target", "0.5",
         "--round-to", "8", "--eval", MODELS / "mnist_test.npz", "--report", rep_path)
    rep = json.loads(rep_path.read_text())
    assert rep["criterion"] == "aofp"
    assert rep["verification"]["passed"] is True
    # round_widths floors groups back to a multiple of 8 while the target is exceeded, so with every
    # searched width ≥ 8 the rounded model still meets the target
    assert rep["macs_after"] <= 0.5 * rep["macs_before"]
    assert rep["params_after"] < rep["params_before"]
    narrowed = [g for g in rep["groups"] if g["width_after"] != g["width_before"]]
    assert narrowed
    for g in rep["groups"]:
        assert g["width_after"] == g["width_before"] or g["width_after"] % 8 == 0, g
    assert rep["search"]["trials"] > 0 and rep["search"]["seconds"] >= 0
    assert "target_reached" not in rep["search"]
    assert rep["latency_ms"]["provider"] == resolve_provider("auto")  # CUDA where a CUDA session runs
    assert rep["accuracy"]["before"] >= 0.97 and rep["accuracy"]["samples"] == 1000
    assert 0 <= rep["accuracy"]["after"] <= 1
    # the written model runs, at the pruned widths
    onnx.checker.check_model(str(out))
    x = np.load(MODELS / "mnist_test.npz")["input"][:4]
    (logits,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert logits.shape == (4, 10) and np.all(np.isfinite(logits))
