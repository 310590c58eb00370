"""Tests for aofp_onnx.runtime: provider resolution, Runner outputs against numpy, latency summaries."""

import gc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from aofp_onnx import runtime
from aofp_onnx.errors import InputError
from aofp_onnx.modeldata import split_weights
from aofp_onnx.runtime import CPU, CUDA, Runner, _cuda_runs, latency_ms, resolve_provider

W = np.arange(12, dtype=np.float32).reshape(3, 4) / 10 - 0.5
B = np.array([0.1, -0.2, 0.3, 0.0], np.float32)


def gemm_relu_model(batch: int | str = "N"):
    """y = relu(x @ W + b), z = x + 1: two outputs, a dynamic batch (or one pinned to `batch`), weights as
    initializers."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch, 3])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["y"]),
        helper.make_node("Add", ["x", "one"], ["z"]),
    ]
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B"),
             numpy_helper.from_array(np.ones(1, np.float32), "one")]
    graph = helper.make_graph(nodes, "gemm_relu", [x], [y, z], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def two_input_model():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 2])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 2])
    graph = helper.make_graph([helper.make_node("Mul", ["a", "b"], ["s"])], "mul", [a, b], [s])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def expected_y(x):
    return np.maximum(x @ W + B, 0)


X = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)


def test_resolve_provider_on_this_machine():
    """auto is CUDA exactly where a CUDA session runs; cuda elsewhere is refused with the reason."""
    assert resolve_provider("cpu") == CPU
    if _cuda_runs():
        assert resolve_provider("auto") == resolve_provider("cuda") == CUDA
    else:
        assert resolve_provider("auto") == CPU
        with pytest.raises(InputError, match="provider cuda: onnxruntime cannot run a session on CUDAExecution"):
            resolve_provider("cuda")
    with pytest.raises(InputError, match="provider must be one of auto, cpu, cuda, got 'gpu'"):
        resolve_provider("gpu")


def test_runner_outputs_match_numpy():
    runner = Runner(gemm_relu_model(), "cpu")
    assert runner.provider == CPU
    assert runner.input_names == ["x"]
    assert runner.output_names == ["y", "z"]
    y, z = runner.run({"x": X})
    np.testing.assert_allclose(y, expected_y(X), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(z, X + 1, rtol=1e-6)
    (only_z,) = runner.run({"x": X[:2]}, outputs=["z"])
    np.testing.assert_allclose(only_z, X[:2] + 1, rtol=1e-6)


@pytest.mark.parametrize("optimization", ["all", "extended", "basic", "disable"])
def test_runner_auto_provider_options(optimization):
    runner = Runner(gemm_relu_model(), "auto", threads=1, optimization=optimization, outputs=["y"])
    assert runner.provider == resolve_provider("auto")
    assert runner.session.get_session_options().intra_op_num_threads == 1
    options = runner.session.get_session_options()
    assert options.graph_optimization_level == runtime.OPTIMIZATION_LEVELS[optimization]
    (y,) = runner.run({"x": X})
    np.testing.assert_allclose(y, expected_y(X), rtol=1e-6, atol=1e-6)


def test_runner_from_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(gemm_relu_model(), path)
    (y, _) = Runner(path, "cpu").run({"x": X})
    np.testing.assert_allclose(y, expected_y(X), rtol=1e-6, atol=1e-6)


def test_large_model_goes_through_external_data(monkeypatch):
    monkeypatch.setattr(runtime, "MAX_IN_MEMORY_BYTES", 0)
    w = np.linspace(-1, 1, 3 * 128, dtype=np.float32).reshape(3, 128)  # over onnx's 1 KiB external threshold
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 128])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "big", [x], [y],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    before = model.SerializeToString()
    runner = Runner(model, "cpu")
    folder = Path(runner._tempdir)
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx.data"]
    (out,) = runner.run({"x": X})
    np.testing.assert_allclose(out, X @ w, rtol=1e-5, atol=1e-6)
    assert model.SerializeToString() == before  # the caller's proto is not rewritten
    del runner
    gc.collect()
    assert not folder.exists()


def test_unloaded_external_data_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(gemm_relu_model(), path, save_as_external_data=True, size_threshold=0, location="m.data")
    model = onnx.load(path, load_external_data=False)
    with pytest.raises(ValueError, match="references external data that is not loaded"):
        Runner(model, "cpu")


def test_persistent_inputs_are_fed_on_every_run():
    runner = Runner(two_input_model(), "cpu")
    a = np.array([[1, 2], [3, 4]], np.float32)
    runner.bind_persistent("a", a)
    (s,) = runner.run({"b": np.full((2, 2), 2, np.float32)})
    np.testing.assert_array_equal(s, [[2, 4], [6, 8]])
    (s,) = runner.run({"b": np.full((2, 2), -1, np.float32)})
    np.testing.assert_array_equal(s, -a)
    (s,) = runner.run({"a": np.ones((2, 2), np.float32), "b": a})  # a feed overrides the persistent one
    np.testing.assert_array_equal(s, a)


def test_iobinding_path_binds_in_output_order():
    """The IOBinding path (used on CUDA) exercised on CPU memory: same numbers, requested order."""
    runner = Runner(gemm_relu_model(), "cpu")
    runner._device = "cpu"
    runner.bind_persistent("x", X)
    assert isinstance(runner._persistent["x"], ort.OrtValue)
    z, y = runner.run({}, outputs=["z", "y"])
    np.testing.assert_allclose(y, expected_y(X), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(z, X + 1, rtol=1e-6)
    (y2, _) = runner.run({"x": X[:2]})
    np.testing.assert_allclose(y2, expected_y(X[:2]), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not _cuda_runs(), reason="no CUDA session runs here (CPU-only onnxruntime or no GPU)")
def test_cuda_runner_feeds_through_iobinding_and_matches_cpu():
    """On a GPU: the session runs on CUDA in full FP32 (TF32 only for timing runners), inputs go through
    IOBinding (a persistent one stays a device OrtValue), and the numbers match the CPU session's, in the
    requested order, pinned batches split alike."""
    runner = Runner(gemm_relu_model(), "cuda")
    assert runner.provider == CUDA and runner._device == "cuda"
    assert runner.session.get_provider_options()[CUDA]["use_tf32"] == "0"
    assert Runner(gemm_relu_model(), "cuda", exact=False).session.get_provider_options()[CUDA]["use_tf32"] == "1"
    runner.bind_persistent("x", X)
    value = runner._persistent["x"]
    assert isinstance(value, ort.OrtValue) and value.device_name().lower() == "cuda"
    z, y = runner.run({}, outputs=["z", "y"])
    cpu_y, cpu_z = Runner(gemm_relu_model(), "cpu").run({"x": X})
    np.testing.assert_allclose(y, cpu_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(z, cpu_z)
    pinned = Runner(gemm_relu_model(batch=2), "cuda")
    (y5, _) = pinned.run({"x": X})  # 5 samples through a batch pinned to 2: three runs, the last padded
    np.testing.assert_allclose(y5, cpu_y, rtol=1e-5, atol=1e-5)


def conv_model():
    """y = Conv(x, W) with W [64, 32, 3, 3]: an initializer large enough to live outside the proto."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64, 16, 16])
    w = np.random.default_rng(1).standard_normal((64, 32, 3, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])], "conv", [x], [y],
                              initializer=[numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.skipif(not _cuda_runs(), reason="no CUDA session runs here (CPU-only onnxruntime or no GPU)")
def test_cuda_runner_of_split_weights_matches_cpu():
    """An unoptimized session over weights held outside the proto (verify's sessions): on CPU the arrays are
    shared with the session; on CUDA they are copied in, since sharing host OrtValues with onnxruntime-gpu
    1.31's CUDA provider gave the shipped MNIST CNN's layers off by 1.14 relative, and cuts failed their
    verification."""
    data = split_weights(conv_model())
    assert data.weights  # the weight is a numpy array, not in the proto
    x = {"x": np.random.default_rng(2).standard_normal((2, 32, 16, 16)).astype(np.float32)}
    (cpu,) = Runner(data, "cpu", optimization="disable", prepack=False, arena=False).run(x)
    (cuda,) = Runner(data, "cuda", optimization="disable", prepack=False, arena=False).run(x)
    np.testing.assert_allclose(cuda, cpu, rtol=1e-4, atol=1e-4 * np.abs(cpu).max())


def test_split_weights_are_shared_with_cpu_sessions_only(monkeypatch):
    """The zero-copy path (`Runner._shared_weights`) serves unoptimized CPU sessions; a CUDA session gets the
    materialized model (here onnxruntime, without a GPU, then runs it on its CPU fallback)."""
    data, shared = split_weights(conv_model()), []
    original = Runner._shared_weights
    monkeypatch.setattr(Runner, "_shared_weights", lambda self, *a: shared.append(1) or original(self, *a))
    x = {"x": np.ones((1, 32, 16, 16), np.float32)}
    (cpu,) = Runner(data, "cpu", optimization="disable").run(x)
    assert shared == [1]
    monkeypatch.setattr(runtime, "resolve_provider", lambda provider: CUDA)
    (other,) = Runner(data, "cuda", optimization="disable").run(x)
    assert shared == [1]
    np.testing.assert_allclose(other, cpu, rtol=1e-4, atol=1e-4 * np.abs(cpu).max())


def test_runner_refusals(tmp_path):
    with pytest.raises(InputError, match="model file not found: .*missing.onnx"):
        Runner(tmp_path / "missing.onnx", "cpu")
    with pytest.raises(InputError, match="optimization must be one of all, extended, basic, disable, got 'max'"):
        Runner(gemm_relu_model(), "cpu", optimization="max")
    with pytest.raises(InputError, match="threads must be at least 1, got 0"):
        Runner(gemm_relu_model(), "cpu", threads=0)
    with pytest.raises(ValueError, match=r"unknown output\(s\) q \(model outputs: y, z\)"):
        Runner(gemm_relu_model(), "cpu", outputs=["q"])
    runner = Runner(two_input_model(), "cpu")
    with pytest.raises(ValueError, match="missing: b; unknown: c"):
        runner.run({"a": np.ones((1, 2), np.float32), "c": np.ones((1, 2), np.float32)})
    with pytest.raises(ValueError, match="unknown input 'c' \\(model inputs: a, b\\)"):
        runner.bind_persistent("c", np.ones((1, 2), np.float32))


def test_latency_ms_two_runners():
    runners = [Runner(gemm_relu_model(), "cpu"), Runner(two_input_model(), "cpu")]
    feeds = [{"x": X}, {"a": np.ones((4, 2), np.float32), "b": np.ones((4, 2), np.float32)}]
    stats = latency_ms(runners, feeds, warmup=1, repeats=7)
    assert len(stats) == 2
    for s in stats:
        assert set(s) == {"median", "p10", "p90", "repeats"}
        assert s["repeats"] == 7
        assert 0 < s["p10"] <= s["median"] <= s["p90"]


def test_latency_ms_refusals():
    runner = Runner(gemm_relu_model(), "cpu")
    with pytest.raises(ValueError, match="1 runners but 2 feed dicts"):
        latency_ms([runner], [{"x": X}, {"x": X}])
    with pytest.raises(ValueError, match="need warmup >= 0 and repeats >= 1"):
        latency_ms([runner], [{"x": X}], repeats=0)


def test_work_sessions_do_not_spin_and_timing_sessions_do():
    """Sessions that take turns (trials, checks, parts) leave the cores to the next; timing runners measure a
    deployment's default, whose threads spin."""
    def spinning(runner) -> bool:
        try:
            entry = runner.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        except RuntimeError:  # not set: onnxruntime's default, spinning
            return True
        return entry != "0"

    assert not spinning(Runner(gemm_relu_model(), "cpu"))
    assert spinning(Runner(gemm_relu_model(), "cpu", exact=False, spin=True))
