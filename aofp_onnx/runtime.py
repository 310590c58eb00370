"""onnxruntime sessions with one lifecycle: build once, run many.

`resolve_provider` turns auto/cpu/cuda into an execution provider, trusting CUDA only after a tiny
session really runs on it. A `Runner` owns one session; on CUDA it feeds inputs through IOBinding
and can keep an input on the device across calls (`bind_persistent`), so a calibration batch is
uploaded once. An input whose batch the file pins to b takes any number n of samples: the runner
splits the feeds into ceil(n / b) runs of b (the last one padded by repeating its last sample) and
concatenates the outputs along axis 0 (trimmed to n); every feed with n rows is split alike, the
others (e.g. a [1, S] mask) go whole to every run. `latency_ms` times several runners round-robin so
machine noise hits them alike. CUDA sessions run in full FP32 (no TF32) except the timing ones.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from .errors import InputError
from .modeldata import ModelData, is_placeholder

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDERS = ("auto", "cpu", "cuda")
OPTIMIZATION_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
# protobuf refuses to serialize 2 GiB; larger models go through a file with external data
MAX_IN_MEMORY_BYTES = int(1.8e9)
QUIET = 4  # fatal only: onnxruntime's failures reach the user as our one-line errors, never as its log
ort.set_default_logger_severity(QUIET)  # the C++ default logger (environment creation, provider loading)


def resolve_provider(provider: str) -> str:
    """The execution provider for "auto", "cpu" or "cuda"; "cuda" must really run here."""
    if provider not in PROVIDERS:
        raise InputError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    if provider == "cpu":
        return CPU
    if _cuda_runs():
        return CUDA
    if provider == "cuda":
        raise InputError("provider cuda: onnxruntime cannot run a session on CUDAExecutionProvider here "
                         "(missing CUDA/cuDNN libraries or no GPU); use --provider cpu or auto")
    return CPU


@functools.cache
def _cuda_runs() -> bool:
    """Whether a 1-node Relu session runs on CUDAExecutionProvider (probed once per process). When the
    CUDA/cuDNN libraries are not on the loader's path, onnxruntime's own `preload_dlls` loads them from the
    nvidia pip packages (onnxruntime-gpu[cuda,cudnn], or a CUDA torch's) first, its messages silenced."""
    if CUDA not in ort.get_available_providers():
        return False
    if _cuda_probe():
        return True
    if not hasattr(ort, "preload_dlls"):
        return False
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            ort.preload_dlls()
        except Exception:  # a library it cannot load: CUDA stays unusable
            return False
    return _cuda_probe()


def _cuda_probe() -> bool:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    try:  # a failed CUDA load would log errors; the probe's answer says it all
        session = ort.InferenceSession(model.SerializeToString(), providers=[CUDA, CPU])
        session.run(None, {"x": np.ones(1, np.float32)})
        return session.get_providers()[0] == CUDA
    except Exception:  # any failure to start CUDA means "not usable"
        return False


def _session_options(threads: int | None, optimization: str) -> ort.SessionOptions:
    if optimization not in OPTIMIZATION_LEVELS:
        raise InputError(f"optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}, got {optimization!r}")
    options = ort.SessionOptions()
    options.log_severity_level = QUIET
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    if threads is not None:
        if threads < 1:
            raise InputError(f"threads must be at least 1, got {threads}")
        options.intra_op_num_threads = threads
    return options


def pinned_batches(model: onnx.ModelProto) -> dict[str, int]:
    """Graph inputs (not initializers) whose dim 0 the file fixes: {name: b}. A dim_param or
    Paddle's `dim_value: -1` is dynamic."""
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name not in inits and dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            out[vi.name] = int(dims[0].dim_value)
    return out


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)


class Runner:
    """One onnxruntime session over a model (a ModelProto or a path), built once and run many times."""

    def __init__(self, model: onnx.ModelProto | ModelData | str | os.PathLike, provider: str = "auto", *,
                 threads: int | None = None, optimization: str = "all", outputs: list[str] | None = None,
                 prepack: bool = True, arena: bool = True, device_id: int = 0, exact: bool = True,
                 spin: bool = False):
        """`exact` (CUDA): full FP32 arithmetic. With the provider's default, TF32 tensor cores round conv and
        matmul inputs to 10 mantissa bits: outputs move by ~1e-3 relative, ten times the verification's
        tolerance, and differently for two widths that pick different kernels. `spin`: the intra-op threads
        spin after a run, waiting for the next (onnxruntime's default). The search's sessions take turns
        (trials, output checks, a group's part), and each one's spinning threads held the cores the next one
        ran on: the PP-OCR classifier's search at 0.7 of the MACs (`--accept-by output`) took 41.7 s without
        spinning against 76.3 s, prune's fit on its 26 parts 4.0 s against 10.6 s. Timing runners pass
        exact=False and spin=True, to measure what a deployment runs."""
        resolved = resolve_provider(provider)
        cuda_options = {"device_id": device_id, "use_tf32": "0" if exact else "1"}
        providers = [(CUDA, cuda_options), CPU] if resolved == CUDA else [CPU]
        self.device_id = device_id  # the GPU of a CUDA session
        self._tempdir: str | None = None  # a large model's files, removed with the runner
        options = _session_options(threads, optimization)
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not prepack:  # kernels would keep a re-laid-out copy of every weight
            options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = arena  # without it, activations are freed after each run
        if isinstance(model, ModelData) and optimization == "disable" and model.weights and resolved == CPU:
            source = self._shared_weights(model, options)
        else:
            source = self._source(model.materialize() if isinstance(model, ModelData) else model)
        self.session = ort.InferenceSession(source, options, providers=providers)
        self.provider: str = self.session.get_providers()[0]
        self._device = "cuda" if self.provider == CUDA else None  # None: plain session.run, no IOBinding
        self.input_names: list[str] = [i.name for i in self.session.get_inputs()]
        self.output_names: list[str] = [o.name for o in self.session.get_outputs()]
        self.outputs = self._checked_outputs(outputs) if outputs is not None else list(self.output_names)
        self.pinned: dict[str, int] = {i.name: i.shape[0] for i in self.session.get_inputs()
                                       if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0}
        self._persistent: dict[str, np.ndarray | ort.OrtValue] = {}

    def _shared_weights(self, data: ModelData, options: ort.SessionOptions) -> str:
        """A model file whose large initializers are the caller's arrays, shared with the session (zero copy).

        The placeholders point into a sparse file of the right size (ORT wants external data to exist),
        and every one of them is handed over with `add_initializer`, which ORT uses in place. Only for CPU
        sessions without graph optimization: optimizers would read the placeholder file, not the arrays, and
        on CUDA (onnxruntime-gpu 1.31.1, an H200) the handed-over host arrays gave outputs off by 1.14
        relative, so CUDA sessions get the materialized model.
        """
        proto = data.copy_proto()
        self._tempdir = tempfile.mkdtemp(prefix="aofp-onnx-")
        weakref.finalize(self, shutil.rmtree, self._tempdir, ignore_errors=True)
        self._shared = []  # the arrays and OrtValues must outlive the session
        offset = 0
        for init in proto.graph.initializer:
            if not is_placeholder(init):
                continue
            array = np.ascontiguousarray(data.weights[init.name])
            del init.external_data[:]
            for key, value in (("location", "weights.bin"), ("offset", str(offset)), ("length", str(array.nbytes))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
            offset += -(-array.nbytes // 4096) * 4096
            value = ort.OrtValue.ortvalue_from_numpy(array)
            self._shared.append((array, value))
            options.add_initializer(init.name, value)
        with open(os.path.join(self._tempdir, "weights.bin"), "wb") as f:
            f.truncate(offset)  # sparse: no disk, never read
        path = os.path.join(self._tempdir, "model.onnx")
        onnx.save_model(proto, path)
        return path

    def _source(self, model) -> bytes | str:
        if not isinstance(model, onnx.ModelProto):
            if not Path(model).is_file():
                raise InputError(f"model file not found: {model}")
            return str(model)
        if _uses_external_data(model):
            raise ValueError("the ModelProto references external data that is not loaded; "
                             "load it with onnx.load(path) or pass the model path")
        if model.ByteSize() <= MAX_IN_MEMORY_BYTES:
            return model.SerializeToString()
        self._tempdir = tempfile.mkdtemp(prefix="aofp-onnx-")
        weakref.finalize(self, shutil.rmtree, self._tempdir, ignore_errors=True)
        path = os.path.join(self._tempdir, "model.onnx")
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # save_model with external data rewrites the proto it is given
        onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data")
        return path

    def _checked_outputs(self, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise ValueError(f"unknown output(s) {', '.join(unknown)} "
                             f"(model outputs: {', '.join(self.output_names)})")
        return list(names)

    def bind_persistent(self, name: str, array: np.ndarray) -> None:
        """Feed `array` to input `name` on every later run (kept on the device under CUDA)."""
        if name not in self.input_names:
            raise ValueError(f"unknown input {name!r} (model inputs: {', '.join(self.input_names)})")
        self._persistent[name] = array if self._device is None else self._to_device(array)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        """The requested outputs (default: the runner's outputs) as numpy arrays, in that order."""
        names = self.outputs if outputs is None else self._checked_outputs(outputs)
        feeds = {**self._persistent, **feeds}
        unknown = sorted(set(feeds) - set(self.input_names))
        missing = [n for n in self.input_names if n not in feeds]
        if unknown or missing:
            raise ValueError(f"feeds must name exactly the inputs {', '.join(self.input_names)}; "
                             f"missing: {', '.join(missing) or '-'}; unknown: {', '.join(unknown) or '-'}")
        split = self._split(feeds)
        if split is not None:
            return self._run_split(feeds, names, *split)
        return self._run_once(feeds, names)

    def _split(self, feeds: dict) -> tuple[int, int] | None:
        """(n, b) when a pinned input gets n ≠ b samples, else None."""
        sizes = {(v.shape[0], self.pinned[k]) for k, v in feeds.items()
                 if k in self.pinned and isinstance(v, np.ndarray) and v.ndim and v.shape[0] != self.pinned[k]}
        if len(sizes) > 1:
            raise ValueError("inputs pinned to a batch get different sample counts: "
                             + ", ".join(f"{n} for a batch of {b}" for n, b in sorted(sizes)))
        return next(iter(sizes), None)

    def _run_split(self, feeds: dict, names: list[str], n: int, b: int) -> list[np.ndarray]:
        parts: list[list[np.ndarray]] = [[] for _ in names]
        for start in range(0, n, b):
            rows = min(b, n - start)
            chunk = {}
            for k, v in feeds.items():
                if isinstance(v, np.ndarray) and v.ndim and v.shape[0] == n:
                    v = v[start:start + b]
                    if rows < b:
                        v = np.concatenate([v, np.repeat(v[-1:], b - rows, axis=0)])
                chunk[k] = v
            for part, name, y in zip(parts, names, self._run_once(chunk, names)):
                if np.ndim(y) == 0 or len(y) != b:
                    raise ValueError(f"output {name!r} has no batch axis of {b}: feed the model's pinned "
                                     f"batch of {b} sample(s) per run")
                part.append(y[:rows])
        return [np.concatenate(p) for p in parts]

    def _run_once(self, feeds: dict, names: list[str]) -> list[np.ndarray]:
        if self._device is None:
            return self.session.run(names, feeds)
        binding = self.session.io_binding()
        for name, value in feeds.items():
            device_value = value if isinstance(value, ort.OrtValue) else self._to_device(value)
            binding.bind_ortvalue_input(name, device_value)
        for name in names:
            binding.bind_output(name, self._device, self.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _to_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self._device, self.device_id)


def latency_ms(runners: list[Runner], feeds_per_runner: list[dict], *, warmup: int = 3,
               repeats: int = 20, cpu: bool = False) -> list[dict]:
    """Per runner {"median", "p10", "p90", "repeats"} in milliseconds of `run`, measured round-robin.

    Each timed call includes that call's host-to-device input copies and device-to-host output copies.
    `cpu`: the calling thread's CPU time instead of wall time (for one-thread CPU sessions, which run on
    the calling thread: their wall time on an idle machine, without other processes' preemption).
    """
    if len(runners) != len(feeds_per_runner):
        raise ValueError(f"{len(runners)} runners but {len(feeds_per_runner)} feed dicts")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    pairs = list(zip(runners, feeds_per_runner))
    for _ in range(warmup):
        for runner, feeds in pairs:
            runner.run(feeds)
    clock = time.thread_time if cpu else time.perf_counter
    times = [[] for _ in runners]
    for _ in range(repeats):
        for i, (runner, feeds) in enumerate(pairs):
            start = clock()
            runner.run(feeds)
            times[i].append((clock() - start) * 1e3)
    return [_summary(t) for t in times]


def _summary(times_ms: list[float]) -> dict:
    p10, median, p90 = np.percentile(times_ms, [10, 50, 90])
    return {"median": float(median), "p10": float(p10), "p90": float(p90), "repeats": len(times_ms)}
