"""The multi-path trial graph (aofp_onnx.trial) against a direct computation of AOFP's damage.

As the module docstring of `trial` defines it: for a keep state K and a trial row r, the damage of
group g is

    t_g = Σ_n rel((Z_n − Z_R,n)·K, Z_n·K)   over g's sink nodes n,

rel the squared error relative per sample, averaged over the batch (`damage_ref`; with
`damage_norm="batch"`, the paper's: relative over the whole batch),

where Y_n is sink n applied (one layer deep, bias included) to its K-masked input X (read from the
masked original, `masking.masked_model`), Z_n is Y_n followed through the chain of single-consumer
elementwise ops behind n whose other inputs are constants (BN, activations, constant affine), ·K
masks Z's channels by K where Z carries channels (the consumer's own removed filters do not count),
and Z_R,n is the same with X·r restricted to g's slots. Here everything after X is recomputed in
float64 with torch from the nodes' attributes and initializers, independently of onnxruntime, and
compared with `TrialEngine.damage`.
"""
from __future__ import annotations

import pathlib

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

import zoo
from aofp_onnx.api import Pruner
from damage_ref import relative
from aofp_onnx.damage_point import resolve_norm
from aofp_onnx.channels.attrs import attr
from aofp_onnx.modeldata import ModelData
from aofp_onnx.masking import KEEP_INPUT, keep_feed, masked_model
from aofp_onnx.runtime import Runner
from aofp_onnx.trial import CHAIN_OPS, DAMAGE_OUTPUT, TRIAL_INPUT, TrialEngine, build_trial_model

REPO = pathlib.Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
CALIB = MODELS / "mnist_calib.npz"
BATCH = 8
REL_TOL = 2e-3


# --- models ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("trial_zoo")


def _load(name: str, zoo_dir: pathlib.Path) -> tuple[Pruner, dict[str, np.ndarray]]:
    """(pruner, one calibration batch): the shipped models on MNIST digits, zoo models on seeded noise."""
    if name in ("mnist_cnn", "resnet20_digits"):
        p = Pruner.load(MODELS / f"{name}.onnx", data=str(CALIB), limit=BATCH)
        return p, next(p.data.batches(BATCH))
    m = zoo.build(name, zoo_dir)
    return Pruner.load(m.path), m.feeds(batch=BATCH, seed=1)


_CACHE: dict[str, tuple] = {}


@pytest.fixture(params=["mnist_cnn", "resnet20_digits", "densenet", "yolov8_neck", "mobilenet_v3", "unet",
                        "paddle_det_op11", "paddle_cls_op17"])
def case(request, zoo_dir):
    """(pruner, feeds, engine) per model, built once per module."""
    name = request.param
    if name not in _CACHE:
        p, feeds = _load(name, zoo_dir)
        _CACHE[name] = (p, feeds, TrialEngine(p.cmap, "cpu", damage_norm="sample"))
    return _CACHE[name]


# --- the direct computation ----------------------------------------------------------------------------
def _sink_inputs(cm, keep: np.ndarray, feeds: dict) -> dict[tuple[int, int], np.ndarray]:
    """The K-masked input X of every sink (node_index, input_index), read from the masked original."""
    proto = masked_model(cm).copy_proto()
    by_output = {n.output[0]: n for n in proto.graph.node}
    names = {}
    for s in {(s.node_index, s.input_index): s for g in cm.prunable for s in g.sinks}.values():
        node = by_output[cm.graph.nodes[s.node_index].output[0]]
        masked = node.input[s.input_index]
        assert masked.startswith("aofp_keep_") and masked.endswith("_out"), masked
        names[(s.node_index, s.input_index)] = masked
    wanted = sorted(set(names.values()))
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in wanted)
    runner = Runner(ModelData(proto, masked_model(cm).weights), "cpu")
    values = dict(zip(wanted, runner.run({**feeds, KEEP_INPUT: keep_feed(keep)}, wanted)))
    return {k: values[v] for k, v in names.items()}


def _conv_pads(node, spatial: int) -> list[int]:
    assert attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"), "auto_pad not handled by the reference"
    pads = attr(node, "pads", [0] * (2 * spatial))
    begin, end = pads[:spatial], pads[spatial:]
    out = []
    for b, e in zip(reversed(begin), reversed(end)):  # F.pad: last dim first
        out += [b, e]
    return out


def _const(cm, name: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(cm.graph.array(name), np.float64))


def _apply(cm, node, x: np.ndarray) -> np.ndarray:
    """The sink node's output (bias included), in float64, from the node's attributes and initializers."""
    x = torch.from_numpy(np.asarray(x, np.float64))
    w = _const(cm, node.input[1])
    bias = _const(cm, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "Conv":
        spatial = x.dim() - 2
        assert spatial == 2
        x = F.pad(x, _conv_pads(node, spatial))
        y = F.conv2d(x, w, bias, attr(node, "strides", [1, 1]), 0, attr(node, "dilations", [1, 1]),
                     attr(node, "group", 1))
    elif node.op_type == "ConvTranspose":
        pads = attr(node, "pads", [0, 0, 0, 0])
        assert pads[:2] == pads[2:], "asymmetric ConvTranspose pads not handled by the reference"
        assert not attr(node, "output_shape"), "output_shape not handled by the reference"
        y = F.conv_transpose2d(x, w, bias, attr(node, "strides", [1, 1]), pads[:2],
                               attr(node, "output_padding", [0, 0]), attr(node, "group", 1),
                               attr(node, "dilations", [1, 1]))
    elif node.op_type == "Gemm":
        a = x.T if attr(node, "transA", 0) else x
        b = w.T if attr(node, "transB", 0) else w
        y = attr(node, "alpha", 1.0) * (a @ b)
        if bias is not None:
            y = y + attr(node, "beta", 1.0) * bias
    elif node.op_type == "MatMul":
        y = x @ w
    else:
        raise AssertionError(f"no reference for sink op {node.op_type}")
    return y.numpy()


def _channel_shaped(c: torch.Tensor, rank: int) -> torch.Tensor:
    return c.reshape([1, -1] + [1] * (rank - 2))


def _elementwise(cm, node, x: np.ndarray) -> np.ndarray:
    """One op of a consumer's chain (data on input 0, constants elsewhere), in float64."""
    x = torch.from_numpy(x)
    op = node.op_type
    consts = [_const(cm, n) if n else None for n in node.input[1:]]
    if op == "Relu":
        y = torch.clamp(x, min=0)
    elif op == "LeakyRelu":
        y = F.leaky_relu(x, attr(node, "alpha", 0.01))
    elif op == "PRelu":
        y = torch.where(x < 0, x * consts[0], x)
    elif op == "Clip":
        lo, hi = (consts + [None, None])[:2] if cm.graph.opset >= 11 else (attr(node, "min"), attr(node, "max"))
        y = torch.clamp(x, min=None if lo is None else float(lo), max=None if hi is None else float(hi))
    elif op == "Sigmoid":
        y = torch.sigmoid(x)
    elif op == "Tanh":
        y = torch.tanh(x)
    elif op == "HardSigmoid":
        y = torch.clamp(attr(node, "alpha", 0.2) * x + attr(node, "beta", 0.5), 0, 1)
    elif op == "HardSwish":
        y = x * torch.clamp(x / 6 + 0.5, 0, 1)
    elif op == "Elu":
        y = F.elu(x, attr(node, "alpha", 1.0))
    elif op == "Selu":
        y = attr(node, "gamma", 1.0507009873554805) * torch.where(
            x > 0, x, attr(node, "alpha", 1.6732632423543772) * (torch.exp(x) - 1))
    elif op == "Celu":
        y = F.celu(x, attr(node, "alpha", 1.0))
    elif op == "Gelu":
        approximate = attr(node, "approximate", "none")
        y = F.gelu(x, approximate=approximate.decode() if isinstance(approximate, bytes) else approximate)
    elif op == "Mish":
        y = F.mish(x)
    elif op == "Softplus":
        y = F.softplus(x)
    elif op == "BatchNormalization":
        scale, b, mean, var = (_channel_shaped(c, x.dim()) for c in consts[:4])
        y = (x - mean) / torch.sqrt(var + attr(node, "epsilon", 1e-5)) * scale + b
    elif op in ("Add", "Sub", "Mul", "Div"):
        y = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[op](x, consts[0])
    elif op == "Identity":
        y = x
    else:
        raise AssertionError(f"no reference for chain op {op}")
    return y.numpy()


def _chain(cm, node) -> list:
    """Single-consumer elementwise ops behind `node` that read it on input 0 with constant other inputs."""
    chain, tensor = [], node.output[0]
    while tensor not in cm.graph.outputs:
        readers = cm.graph.consumers.get(tensor, [])
        if len(readers) != 1:
            break
        follower, index = readers[0]
        if follower.op_type not in CHAIN_OPS or index != 0 or follower.domain not in ("", "ai.onnx"):
            break
        if any(n and cm.graph.array(n) is None for n in follower.input[1:]):
            break
        chain.append(follower)
        tensor = follower.output[0]
    return chain


def _response(cm, node, chain, x: np.ndarray) -> np.ndarray:
    z = _apply(cm, node, x)
    for follower in chain:
        z = _elementwise(cm, follower, z)
    return z


def direct_damage(cm, keep: np.ndarray, rows: np.ndarray, feeds: dict, norm: str = "sample") -> np.ndarray:
    """[T, G]: per group, Σ_sinks of the relative error of (Z − Z_R)·K to Z·K (`damage_ref`), every sink one
    layer deep from X_K."""
    xs = _sink_inputs(cm, keep, feeds)
    out = np.zeros((len(rows), len(cm.prunable)))
    base = {}
    for t, r in enumerate(rows):
        for k, g in enumerate(cm.prunable):
            for s in g.sinks:
                node = cm.graph.nodes[s.node_index]
                x = xs[(s.node_index, s.input_index)]
                chain = _chain(cm, node)
                key = (s.node_index, s.input_index)
                if key not in base:
                    base[key] = _response(cm, node, chain, x)
                z = base[key]
                end = chain[-1].output[0] if chain else node.output[0]
                own = np.ones_like(z)
                if end in cm.tensor_axis:  # Z's channels removed by K do not count
                    shape = [1] * z.ndim
                    shape[cm.tensor_axis[end]] = -1
                    own = own * keep[cm.positions(end)].reshape(shape)
                pos = cm.positions(s.tensor)
                inside = (pos >= g.offset) & (pos < g.offset + g.width)
                shape = [1] * x.ndim
                shape[cm.tensor_axis[s.tensor]] = len(pos)
                mask = np.where(inside, r[pos], 1.0).reshape(shape)
                z_r = _response(cm, node, chain, x * mask)
                out[t, k] += relative([((z - z_r) * own, z * own)], norm)
    return out


def _random_keep(cm, rng, frac: float = 0.25) -> np.ndarray:
    keep = cm.full_keep()
    for g in cm.prunable:
        k = np.ones(g.width, bool)
        k[rng.choice(g.width, int(g.width * frac), replace=False)] = False
        keep[g.slots] = k
    return keep


def _random_rows(cm, keep, rng, n: int) -> np.ndarray:
    """AOFP trial rows: each removes a random half of every group's kept channels (column S stays 1)."""
    rows = np.ones((n, cm.n_slots + 1), np.float32)
    for r in rows:
        for g in cm.prunable:
            live = g.slots[keep[g.slots]]
            r[rng.choice(live, len(live) // 2, replace=False)] = 0.0
    return rows


# --- tests ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["sample", "batch"])
def test_trial_damage_equals_direct_computation(case, norm):
    p, feeds, engine = case
    cm = p.cmap
    assert cm.prunable and all(g.sinks for g in cm.prunable)
    rng = np.random.default_rng(0)
    keep = _random_keep(cm, rng)
    rows = _random_rows(cm, keep, rng, 3)
    if norm == "batch":  # the paper's ratio over the whole batch
        engine = TrialEngine(cm, "cpu", damage_norm="batch")
    got = engine.damage(keep, rows, feeds)
    want = direct_damage(cm, keep, rows, feeds, norm)
    assert got.shape == want.shape == (3, len(cm.prunable))
    # (a trial may remove only dead channels, e.g. of an SE squeeze conv whose ReLU is 0: damage 0)
    assert np.all(want >= 0) and (want > 0).mean() > 0.8 and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=REL_TOL, atol=0)


def test_auto_normalizes_per_sample_on_classifiers_only(case, request):
    """`--damage-norm auto`: per sample where every output is [N, C] (or [N, C, 1, 1]), else over the batch."""
    p, _, _ = case
    shapes = [p.cmap.graph.shape(o) for o in p.cmap.graph.outputs]
    classifier = all(len(s) >= 2 and all(d == 1 for d in s[2:]) for s in shapes)
    assert resolve_norm(p.cmap, "auto") == ("sample" if classifier else "batch")
    assert resolve_norm(p.cmap, "batch") == "batch" and resolve_norm(p.cmap, "sample") == "sample"
    expect = {"mnist_cnn": True, "resnet20_digits": True, "mobilenet_v3": True, "yolov8_neck": False, "unet": False,
              "paddle_det_op11": False, "paddle_cls_op17": True, "densenet": True}
    name = request.node.callspec.params["case"]
    assert classifier == expect.get(name, classifier), (name, shapes)


def test_per_sample_damage_is_the_mean_of_each_samples_damage(case):
    """Relative per sample, a batch's damage is the mean of its samples' damages, each measured alone (no
    sample's energy here is under the floor)."""
    p, feeds, engine = case
    cm = p.cmap
    rng = np.random.default_rng(3)
    keep = _random_keep(cm, rng)
    rows = _random_rows(cm, keep, rng, 2)
    n = len(next(iter(feeds.values())))
    alone = [engine.damage(keep, rows, {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(n)]
    np.testing.assert_allclose(engine.damage(keep, rows, feeds), np.mean(alone, axis=0), rtol=REL_TOL, atol=1e-9)


def test_one_channel_trials_equal_direct_computation(case):
    """Small damages (one channel removed per group) are measured as precisely as large ones."""
    p, feeds, engine = case
    cm = p.cmap
    rng = np.random.default_rng(1)
    keep = _random_keep(cm, rng)
    rows = np.ones((2, cm.n_slots + 1), np.float32)
    for r in rows:
        for g in cm.prunable:
            r[rng.choice(g.slots[keep[g.slots]])] = 0.0
    got = engine.damage(keep, rows, feeds)
    want = direct_damage(cm, keep, rows, feeds)
    np.testing.assert_allclose(got, want, rtol=REL_TOL, atol=1e-9)


def test_full_keep_and_all_ones_row_give_zero_damage(case):
    p, feeds, engine = case
    cm = p.cmap
    rng = np.random.default_rng(2)
    for keep in (cm.full_keep(), _random_keep(cm, rng)):
        rows = np.ones((2, cm.n_slots + 1), np.float32)
        got = engine.damage(keep, rows, feeds)
        assert got.shape == (2, len(cm.prunable))
        assert np.all(np.abs(got) <= 1e-9), got.max()


def test_removing_all_but_one_channel_hurts_more_than_removing_one(case):
    p, feeds, engine = case
    cm = p.cmap
    rng = np.random.default_rng(3)
    keep = _random_keep(cm, rng)
    one = np.ones((1, cm.n_slots + 1), np.float32)
    most = np.ones((1, cm.n_slots + 1), np.float32)
    for g in cm.prunable:
        live = rng.permutation(g.slots[keep[g.slots]])
        one[0, live[0]] = 0.0
        most[0, live[:-1]] = 0.0  # includes live[0]
    d_one = engine.damage(keep, one, feeds)[0]
    d_most = engine.damage(keep, most, feeds)[0]
    several = [k for k, g in enumerate(cm.prunable) if keep[g.slots].sum() > 2]
    assert several
    assert np.all(d_most[several] > d_one[several]), (d_one, d_most)
    assert np.all(d_one >= 0)
    # a stacked run scores each row as if alone
    both = engine.damage(keep, np.concatenate([one, most]), feeds)
    np.testing.assert_allclose(both, np.stack([d_one, d_most]), rtol=1e-4, atol=1e-9)


def test_groups_no_row_touches_score_zero_and_the_others_as_in_the_full_graph(case):
    """Saturated groups are left out of the run (a session for the searching ones) without changing theirs."""
    p, feeds, engine = case
    cm = p.cmap
    rng = np.random.default_rng(4)
    keep = _random_keep(cm, rng)
    rows = _random_rows(cm, keep, rng, 2)
    full = engine.damage(keep, rows, feeds)
    resting = list(range(0, len(cm.prunable), 2))
    searching = [k for k in range(len(cm.prunable)) if k not in resting]
    for k in resting:
        rows[:, cm.prunable[k].slots] = 1.0
    for _ in range(2):  # built once, then reused
        got = engine.damage(keep, rows, feeds)
        assert np.all(got[:, resting] == 0.0)
        np.testing.assert_allclose(got[:, searching], full[:, searching], rtol=REL_TOL, atol=1e-9)
    assert engine.damage(keep, np.ones_like(rows), feeds).max() == 0.0


@pytest.mark.parametrize("name", ["mnist_cnn", "densenet", "mobilenet_v3"])
def test_trial_graph_is_valid_onnx_with_only_damage_outputs(name, zoo_dir):
    p, _ = _load(name, zoo_dir)
    cm = p.cmap
    data = build_trial_model(cm)
    model = data.materialize()
    onnx.checker.check_model(model, full_check=True)
    outputs = {o.name: o for o in model.graph.output}
    assert set(outputs) == {DAMAGE_OUTPUT}
    dims = [d.dim_param or d.dim_value for d in outputs[DAMAGE_OUTPUT].type.tensor_type.shape.dim]
    assert dims == ["trials", len(cm.prunable)]
    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    assert set(inputs) == set(p.graph.inputs) | {KEEP_INPUT, TRIAL_INPUT}
    # and it runs: [T, G] damages, nonzero only where a row removes something
    runner = Runner(data, "cpu")
    feeds = p.feeds(2, 2)[0]
    rows = np.ones((3, cm.n_slots + 1), np.float32)
    rows[:, cm.prunable[0].slots[0]] = 0.0
    (damage,) = runner.run({**feeds, KEEP_INPUT: keep_feed(cm.full_keep()), TRIAL_INPUT: rows})
    assert damage.shape == (3, len(cm.prunable))
    assert np.all(damage[:, 0] > 0) and np.all(np.abs(damage[:, 1:]) <= 1e-9)


def test_the_cases_above_cover_concat_and_consumer_chains(zoo_dir):
    """densenet / yolov8_neck: a sink reads a Concat of several prunable groups (the trial mask must be
    restricted to g's slots); the paddle models: chains through BN, constant Mul/Add and PRelu."""
    for name in ("densenet", "yolov8_neck"):
        cm = _load(name, zoo_dir)[0].cmap
        mixed = [s for g in cm.prunable for s in g.sinks
                 if len({k for k, h in enumerate(cm.prunable) if np.isin(cm.positions(s.tensor), h.slots).any()}) > 1]
        assert mixed, name
    ops = set()
    for name in ("paddle_det_op11", "paddle_cls_op17"):
        cm = _load(name, zoo_dir)[0].cmap
        ops |= {f.op_type for g in cm.prunable for s in g.sinks for f in _chain(cm, cm.graph.nodes[s.node_index])}
    assert {"BatchNormalization", "Mul", "Add", "PRelu", "Relu", "HardSwish"} <= ops


@pytest.mark.parametrize("pairs, expected", [(6, 4 * 4096), (1, 2 * 2048)])
def test_stack_bound_is_the_liveness_peak_times_the_factor(tmp_path, pairs, expected):
    """activation_bytes: STACK_FACTOR (4) x the peak of the live outputs per sample, each freed after its last
    consumer, never above the sum of all outputs. A chain of `pairs` Conv(8) -> Relu at 8x8, float32: every
    output 2048 bytes, at most two live (4096), the sum 2 x pairs x 2048: six pairs 4 x 4096 = 16384 (the sum
    24576), one pair its sum 4096."""
    from onnx import TensorProto, helper, numpy_helper

    from aofp_onnx.trial import STACK_FACTOR, activation_bytes

    assert STACK_FACTOR == 4
    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for k in range(pairs):
        weights.append(numpy_helper.from_array(rng.normal(size=(8, 8, 3, 3)).astype(np.float32), f"w{k}"))
        nodes += [helper.make_node("Conv", [x, f"w{k}"], [f"c{k}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{k}"], [f"r{k}"])]
        x = f"r{k}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 8, 8, 8])], weights)
    path = tmp_path / "chain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    assert activation_bytes(Pruner.load(str(path)).cmap) == expected
