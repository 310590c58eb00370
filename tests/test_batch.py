"""Batch however the file declares it: pinned to 1 (torch.onnx.export without dynamic_axes: inputs,
outputs and the Reshape target [1, -1]), dynamic (`dim_param`), Paddle's `dim_value: -1`; and a shape
the model cannot run. Every command runs through the CLI with 20 calibration samples; the written
model keeps the file's declarations."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import aofp_onnx
from aofp_onnx.batch import repin, unpin
from aofp_onnx.graph import Graph, read_model
from aofp_onnx.modeldata import split_weights
from aofp_onnx.runtime import Runner, pinned_batches
from cliutil import ok, run_cli

torch = pytest.importorskip("torch")
nn = torch.nn

SAMPLES = 20
SHAPE = (3, 8, 8)


class Net(nn.Module):
    """conv-BN-ReLU, a residual pair, a strided conv, `x.view(x.size(0), -1)` → Linear."""

    def __init__(self, extra: bool = False):
        super().__init__()
        self.extra = extra  # concat a [1, 1, 4, 4] constant: pins the batch outside any Reshape
        self.c1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.c3 = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1, stride=2), nn.ReLU())
        self.fc = nn.Linear((24 + extra) * 4 * 4, 10)
        self.plane = nn.Parameter(torch.randn(1, 1, 4, 4))

    def forward(self, x):
        y = self.c1(x)
        y = torch.relu(y + self.c2(y))
        y = self.c3(y)
        if self.extra:
            y = torch.cat([y, self.plane.expand(y.size(0), -1, -1, -1)], dim=1)
        return self.fc(y.view(y.size(0), -1))


def _export(path, convention: str) -> str:
    torch.manual_seed(0)
    model = Net(extra=convention == "pinned_concat").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    dynamic = convention in ("dynamic", "paddle")
    kwargs = {"dynamic_axes": {"x": {0: "N"}, "y": {0: "N"}}} if dynamic else {}
    batch = 2 if convention == "pinned2" else 1
    torch.onnx.export(model, torch.randn(batch, *SHAPE), str(path), input_names=["x"], output_names=["y"],
                      opset_version=13, dynamo=False, **kwargs)
    if convention == "paddle":  # Paddle2ONNX writes a dynamic dim as dim_value -1
        proto = onnx.load(str(path))
        for vi in [*proto.graph.input, *proto.graph.output]:
            dim = vi.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_value = -1
        onnx.save(proto, str(path))
    return str(path)


CONVENTIONS = ("pinned", "dynamic", "paddle")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    rng = np.random.default_rng(0)
    calib = folder / "calib.npz"
    np.savez(calib, x=rng.standard_normal((SAMPLES, *SHAPE)).astype(np.float32))
    paths = {c: _export(folder / f"{c}.onnx", c) for c in (*CONVENTIONS, "pinned2", "pinned_concat")}
    return folder, paths, str(calib)


def _dims(vi):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def _declarations(path) -> dict:
    """Input/output dims and every int64 Reshape target, as the file has them."""
    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in proto.graph.node if n.op_type == "Constant"}
    targets = []
    for node in proto.graph.node:
        if node.op_type == "Reshape":
            t = inits.get(node.input[1]) or consts.get(node.input[1])
            targets.append(None if t is None else numpy_helper.to_array(t).tolist())  # None: computed
    return {"inputs": [_dims(v) for v in proto.graph.input if v.name not in inits],
            "outputs": [_dims(v) for v in proto.graph.output], "reshapes": targets}


def _same_declarations(original, written) -> None:
    """Dims of inputs/outputs and reshape targets as the file had them, except the cut's channel counts."""
    a, b = _declarations(original), _declarations(written)
    assert a["inputs"] == b["inputs"]
    assert a["outputs"] == b["outputs"]
    assert [t and t[0] for t in a["reshapes"]] == [t and t[0] for t in b["reshapes"]]


# -- units -------------------------------------------------------------------------------------


def test_unpin_rewrites_the_batch_reshape_and_repin_restores_it(exports):
    _, paths, _ = exports
    graph = Graph.from_model(read_model(paths["pinned"])[0])
    copy, record = unpin(graph.data)
    assert record.inputs == {"x": 1} and record.outputs == {"y": 1} and len(record.targets) == 1
    x = np.random.default_rng(1).standard_normal((5, *SHAPE)).astype(np.float32)
    stacked = Runner(copy, "cpu").run({"x": x})[0]
    single = np.concatenate([Runner(graph.data, "cpu").run({"x": x[k:k + 1]})[0] for k in range(5)])
    assert stacked.shape == (5, 10)
    assert np.abs(stacked - single).max() < 1e-5
    back = repin(copy, record).materialize()
    assert pinned_batches(back) == {"x": 1}
    assert _dims(back.graph.output[0]) == [1, 10]
    target = next(i for i in back.graph.initializer if i.data_type == onnx.TensorProto.INT64)
    assert numpy_helper.to_array(target).tolist() == [1, -1]


def test_unpin_refuses_a_batch_pinned_outside_reshapes(exports):
    _, paths, _ = exports
    graph = Graph.from_model(read_model(paths["pinned_concat"])[0])
    assert pinned_batches(graph.model) == {"x": 1}
    assert unpin(graph.data) is None  # the [1, 1, 4, 4] constant of the Concat pins it: not provable


@pytest.mark.parametrize("convention", ["dynamic", "paddle"])
def test_dynamic_batches_are_not_pinned(exports, convention):
    _, paths, _ = exports
    assert pinned_batches(onnx.load(paths[convention])) == {}


def test_runner_splits_feeds_of_a_pinned_batch(exports):
    _, paths, _ = exports
    data = split_weights(onnx.load(paths["pinned_concat"]))
    runner = Runner(data, "cpu")
    x = np.random.default_rng(2).standard_normal((7, *SHAPE)).astype(np.float32)
    y = runner.run({"x": x})[0]
    single = np.concatenate([runner.run({"x": x[k:k + 1]})[0] for k in range(7)])
    assert y.shape == (7, 10)
    assert np.array_equal(y, single)


# -- the CLI on each convention ------------------------------------------------------------------


def test_inspect_sees_the_same_groups_however_the_batch_is_declared(exports):
    folder, paths, _ = exports
    out = folder / "pinned_inspect.json"
    ok(run_cli("inspect", paths["pinned"], "--json", out))
    pinned = json.loads(out.read_text())
    dynamic = aofp_onnx.inspect(paths["dynamic"])
    assert pinned["input_shapes"] == {"x": [1, *SHAPE]}
    assert pinned["macs"] == dynamic["macs"] and pinned["prunable_macs_fraction"] == dynamic["prunable_macs_fraction"]
    widths = [[(g["width"], g["prunable"]) for g in r["groups"]] for r in (pinned, dynamic)]
    assert widths[0] == widths[1]
    assert sum(g["prunable"] for g in pinned["groups"]) == 2


@pytest.mark.parametrize("convention", ["pinned", pytest.param("dynamic", marks=pytest.mark.slow), "paddle"])
def test_prune_aofp_apply_verify_bench(exports, convention):
    folder, paths, calib = exports
    out, plan, rep = (folder / f"{convention}_{s}" for s in ("aofp.onnx", "plan.json", "report.json"))
    ok(run_cli("prune", paths[convention], "-o", out, "--calib", calib, "--flops-target", "0.6", "--batch-size", "8",
               "--plan-out", plan, "--report", rep, "--no-progress", "--provider", "cpu"))
    report = json.loads(rep.read_text())
    assert report["verification"]["passed"] and report["verification"]["max_abs_diff"] < 1e-4
    assert report["macs_after"] <= 0.6 * report["macs_before"] * 1.001
    assert report["latency_ms"]["batch_size"] == (1 if convention == "pinned" else 8)
    if convention == "pinned":
        assert report["batch"] == {"pinned": {"x": 1}, "working_copy": "unpinned (checked on data)",
                                   "reshapes_unpinned": 1}
    else:
        assert "batch" not in report
    _same_declarations(paths[convention], out)
    applied = folder / f"{convention}_applied.onnx"
    ok(run_cli("apply", paths[convention], "--plan", plan, "-o", applied, "--calib", calib, "--provider", "cpu"))
    _same_declarations(paths[convention], applied)
    verified = ok(run_cli("verify", paths[convention], applied, "--plan", plan, "--calib", calib, "--provider", "cpu"))
    assert "passed" in verified.stdout + verified.stderr
    bench_json = folder / f"{convention}_bench.json"
    ok(run_cli("bench", paths[convention], out, "--batch-size", "4", "--repeats", "3", "--warmup", "1",
               "--provider", "cpu", "--json", bench_json))
    rows = json.loads(bench_json.read_text())
    rows = rows["models"] if isinstance(rows, dict) else rows
    assert len(rows) == 2 and all(r["median_ms"] > 0 for r in rows)
    # the written model runs 20 samples in one call (split into runs of its pinned batch where it has one)
    x = np.load(calib)["x"]
    y = Runner(str(out), "cpu").run({"x": x})[0]
    assert y.shape == (SAMPLES, 10) and np.isfinite(y).all()


@pytest.mark.parametrize("convention", ["pinned", "paddle"])
@pytest.mark.parametrize("criterion", ["l1", "descent", "oracle"])
def test_prune_l1_oracle(exports, convention, criterion):
    folder, paths, calib = exports
    out, rep = folder / f"{convention}_{criterion}.onnx", folder / f"{convention}_{criterion}.json"
    ok(run_cli("prune", paths[convention], "-o", out, "--calib", calib, "--criterion", criterion,
               "--flops-target", "0.6", "--batch-size", "8", "--report", rep, "--no-progress", "--provider", "cpu"))
    report = json.loads(rep.read_text())
    assert report["verification"]["passed"] and report["verification"]["max_abs_diff"] < 1e-4
    assert report["macs_after"] <= 0.6 * report["macs_before"] * 1.001
    _same_declarations(paths[convention], out)


def test_pinned_outside_reshapes_runs_one_sample_per_trial(exports):
    folder, paths, calib = exports
    for criterion in ("aofp", "descent", "oracle"):
        out, rep = folder / f"concat_{criterion}.onnx", folder / f"concat_{criterion}.json"
        ok(run_cli("prune", paths["pinned_concat"], "-o", out, "--calib", calib, "--criterion", criterion,
                   "--flops-target", "0.7", "--report", rep, "--no-progress", "--provider", "cpu"))
        report = json.loads(rep.read_text())
        assert report["verification"]["passed"] and report["verification"]["max_abs_diff"] < 1e-4
        assert report["search"]["batch"] == "pinned in the model to 1 sample(s) per run"
        assert report["batch"]["pinned"] == {"x": 1} and report["batch"]["working_copy"].startswith("none")
        assert report["macs_after"] <= 0.7 * report["macs_before"] * 1.001
        _same_declarations(paths["pinned_concat"], out)


def _dynamic_declared_pinned_reshape(src, path) -> str:
    """The pinned export with its batch declared `N` (dim_param) while its Reshape target keeps [1, -1]:
    a graph that runs at batch 1 only under a dynamic declaration (found by the fuzz)."""
    proto = onnx.load(src)
    for vi in [*proto.graph.input, *proto.graph.output]:
        dim = vi.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = "N"
    onnx.save(proto, str(path))
    return str(path)


@pytest.mark.parametrize("criterion", ["l1", "aofp"])
def test_a_batch_declared_dynamic_but_pinned_by_a_reshape(exports, criterion):
    folder, paths, calib = exports
    src = _dynamic_declared_pinned_reshape(paths["pinned"], folder / f"declared_{criterion}.onnx")
    with pytest.raises(Exception, match="Gemm"):  # the file cannot run two samples at once: [1, -1] feeds 768
        Runner(src, "cpu").run({"x": np.zeros((2, *SHAPE), np.float32)})
    out, rep = folder / f"declared_{criterion}_cut.onnx", folder / f"declared_{criterion}_cut.json"
    ok(run_cli("prune", src, "-o", out, "--calib", calib, "--criterion", criterion, "--flops-target", "0.6",
               "--batch-size", "4", "--report", rep, "--no-progress", "--provider", "cpu"))
    report = json.loads(rep.read_text())
    assert report["verification"]["passed"] and report["verification"]["max_abs_diff"] < 1e-4
    assert report["batch"]["pinned_in_graph"] == ["x"] and report["batch"]["reshapes_unpinned"] == 1
    assert report["macs_after"] <= 0.6 * report["macs_before"] * 1.001
    _same_declarations(src, out)  # still `N` in the file, and [1, -1] in its Reshape
    assert _declarations(out)["inputs"] == [["N", *SHAPE]] and _declarations(out)["reshapes"][0] == [1, -1]


def test_pinned_batch_of_two_with_an_odd_sample_count(exports):
    folder, paths, calib = exports
    out, rep = folder / "pinned2_cut.onnx", folder / "pinned2_cut.json"
    ok(run_cli("prune", paths["pinned2"], "-o", out, "--calib", calib, "--calib-limit", "19", "--flops-target", "0.6",
               "--report", rep, "--no-progress", "--provider", "cpu"))
    report = json.loads(rep.read_text())
    assert report["verification"]["passed"] and report["verification"]["max_abs_diff"] < 1e-4
    assert report["latency_ms"]["batch_size"] == 2
    _same_declarations(paths["pinned2"], out)
    assert _declarations(out)["reshapes"][0] == [2, -1]
    x = np.load(calib)["x"][:19]
    y = Runner(str(out), "cpu").run({"x": x})[0]  # 19 samples: runs of 2, the last one padded
    single = np.concatenate([Runner(str(out), "cpu").run({"x": x[k:k + 2]})[0] for k in range(0, 18, 2)])
    assert y.shape == (19, 10) and np.abs(y[:18] - single).max() < 1e-5


@pytest.mark.slow
def test_pinned_reconstruct_and_finetune(exports):
    folder, paths, calib = exports
    src = paths["pinned"]
    out, plan, rec, rep = (folder / f"pinned_{s}" for s in ("l1.onnx", "l1.json", "rec.onnx", "rec.json"))
    ok(run_cli("prune", src, "-o", out, "--calib", calib, "--criterion", "l1", "--flops-target", "0.5",
               "--plan-out", plan, "--no-progress", "--provider", "cpu"))
    ok(run_cli("apply", src, "--plan", plan, "-o", rec, "--calib", calib, "--reconstruct", "--report", rep,
               "--provider", "cpu"))
    report = json.loads(rep.read_text())
    assert report["verification"]["passed"]
    assert report["reconstruction"]["output_error"]["reconstructed"] < report["reconstruction"]["output_error"]["cut"]
    _same_declarations(src, rec)
    tuned, frep = folder / "pinned_tuned.onnx", folder / "pinned_tuned.json"
    ok(run_cli("finetune", out, "--teacher", src, "--data", calib, "-o", tuned, "--epochs", "1", "--batch-size", "8",
               "--lr", "1e-3", "--device", "cpu", "--no-progress", "--provider", "cpu", "--report", frep))
    freport = json.loads(frep.read_text())
    assert freport["distill_error"]["after"] < freport["distill_error"]["before"]
    _same_declarations(src, tuned)
    steps, srep = folder / "pinned_steps.onnx", folder / "pinned_steps.json"
    ok(run_cli("prune", src, "-o", steps, "--calib", calib, "--flops-target", "0.7", "--finetune-steps", "2",
               "--data", calib, "--finetune-batch-size", "8", "--device", "cpu", "--report", srep, "--no-progress",
               "--provider", "cpu"))
    sreport = json.loads(srep.read_text())
    assert sreport["verification"]["passed"] and sreport["search"]["finetune"]["halves"] >= 1
    _same_declarations(src, steps)


def test_a_shape_the_model_cannot_run_is_refused(ppocr_det, tmp_path):
    out = tmp_path / "det.onnx"
    proc = run_cli("prune", ppocr_det, "-o", out, "--calib", "random:2", "--criterion", "l1", "--flops-target", "0.7",
                   "--input-shape", "x:1,3,100,100", "--no-progress")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert lines == ["aofp-onnx: error: input 'x' at shape 1x3x100x100: the model cannot run it; it needs dim 2, "
                     "dim 3 multiples of 32 (e.g. --input-shape x:1,3,128,128)"]
    assert list(tmp_path.iterdir()) == []
    seen = run_cli("inspect", ppocr_det, "--input-shape", "x:1,3,100,100")
    assert seen.returncode == 2 and seen.stderr.strip() == lines[0]
