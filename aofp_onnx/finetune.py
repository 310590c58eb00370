"""Fine-tuning after (or during) the cut: a pluggable step that gives the same graph new initializer values.

A *bridge* is a training framework seen through one callable, ``start(job) -> Training``, found by
name among the Python entry points of group ``aofp_onnx.bridges`` (another package adds its own
framework by registering one; the PyTorch bridge registers ``torch``). The core imports no framework:
it resolves the bridge only when fine-tuning is asked for, and it checks what comes back —
every name an initializer of the model, every shape and dtype unchanged — before writing the values
into the unchanged graph (nodes, names, opset and metadata stay byte for byte what they were).

Losses a bridge implements (``job.mode``):
- ``distill``: Σ_outputs ‖s − t‖² / ‖t‖² over the batch, s the student's and t the teacher's outputs
  on the same unlabelled inputs (no labels needed);
- ``supervised``: cross-entropy of the first output (logits over axis 1) against the labels;
- ``trainer``: the user's ``module:function``, handed the framework's module and the data.

Under torchrun (``WORLD_SIZE`` > 1) a bridge may train data-parallel: every process starts the same
job, rank 0 (`leads`) trains and writes while the others `serve` (mirror its training) and return
once it has written (`release`). A bridge without these methods is one process.
"""
from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, Protocol

import numpy as np
import onnx
from onnx import numpy_helper

from .calib import Data
from .errors import InputError
from .modeldata import ModelData, is_placeholder

ENTRY_POINT_GROUP = "aofp_onnx.bridges"
BUILTIN_BRIDGES = {"torch": "aofp_onnx.bridge.train:start"}  # also usable from a checkout that is not installed
MODES = ("auto", "distill", "supervised", "trainer")


@dataclass
class Options:
    """What every bridge honours; `steps` (when set) replaces `epochs` with a number of optimizer steps."""

    epochs: int = 3
    steps: int | None = None
    lr: float = 1e-4  # Adam; larger steps disturb a model that is already close (raise it for a deep cut)
    batch_size: int = 32
    device: str = "auto"  # auto: CUDA when the framework sees a GPU
    bn: str = "frozen"  # BatchNormalization statistics: frozen, or updated from the batches
    seed: int = 0
    trainer: str | None = None  # "module:function" for mode trainer
    progress: bool = False

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or (self.steps is not None and self.steps < 1):
            raise InputError("--epochs, --batch-size and the number of steps must be at least 1")
        if not self.lr > 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if self.bn not in ("frozen", "update"):
            raise InputError(f"--bn must be 'frozen' or 'update', got {self.bn!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InputError(f"--device must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class Job:
    """One fine-tuning: the model to train, its teacher, data, and constant extra inputs (e.g. a keep mask)."""

    student: ModelData
    teacher: ModelData | None
    data: Data
    val: Data | None
    mode: str
    options: Options
    constants: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Result:
    """What a bridge hands back: initializer values and how training went."""

    values: dict[str, np.ndarray]
    device: str
    history: list[dict] = field(default_factory=list)  # per epoch (or per call): losses, validation metric
    best: dict | None = None  # the history entry whose values these are
    world_size: int = 1  # processes that trained (torchrun)

    def to_json(self) -> dict:
        return {"device": self.device, "history": self.history, "best": self.best, "world_size": self.world_size}


class Training(Protocol):
    """A started fine-tuning; `train` can be called again (training-time AOFP calls it once per half).

    Optional, for data-parallel bridges: `rank` (0 writes), `serve()` (the other ranks: mirror rank
    0's `train` calls until it closes) and `close()` (rank 0, after writing: release the others)."""

    def train(self, steps: int | None = None, constants: dict[str, np.ndarray] | None = None) -> Result: ...


def launched_processes() -> int:
    """How many processes torchrun started for this command (1 without torchrun)."""
    return max(1, int(os.environ.get("WORLD_SIZE") or 1))


def leads(training) -> bool:
    """Whether this process writes: rank 0, or the only process; the others serve rank 0 and return."""
    if getattr(training, "rank", 0) == 0:
        return True
    training.serve()
    return False


def release(training) -> None:
    """Rank 0, once written: let the processes that served it return."""
    close = getattr(training, "close", None)
    if close is not None:
        close()


def bridge_names() -> list[str]:
    found = {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(found | set(BUILTIN_BRIDGES))


def load_bridge(name: str = "torch") -> Callable[[Job], Training]:
    """The `start` callable of the bridge registered as `name` (entry point, else the built-in table)."""
    eps = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    target = eps[0].value if eps else BUILTIN_BRIDGES.get(name)
    if target is None:
        raise InputError(f"no fine-tuning bridge named {name!r}; known: {', '.join(bridge_names())}")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # the torch bridge's own message says what to install
        raise InputError(f"the {name} fine-tuning bridge cannot be loaded: {exc}") from None
    return getattr(module, attr)


def resolve_mode(mode: str, data: Data, teacher: ModelData | None, trainer: str | None) -> str:
    """auto: the user's trainer if given, supervised when the data has labels, else distillation."""
    if mode not in MODES:
        raise InputError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        mode = "trainer" if trainer else "supervised" if data.labels is not None else "distill"
    if mode == "distill" and teacher is None:
        raise InputError("label-free distillation needs the original model (--teacher)")
    if mode == "supervised" and data.labels is None:
        raise InputError(f"supervised fine-tuning needs labels: {data.source} has none "
                         "(a .npz with a 'labels' array, or class sub-folders)")
    if mode == "trainer" and not trainer:
        raise InputError("--mode trainer needs --trainer module:function")
    return mode


def check_teacher(student: ModelData, teacher: ModelData) -> None:
    """The teacher must take the same inputs and give outputs of the same names and count."""
    def names(vis, skip=()):
        return [v.name for v in vis if v.name not in skip]

    s_inits = {t.name for t in student.proto.graph.initializer}
    t_inits = {t.name for t in teacher.proto.graph.initializer}
    if names(student.proto.graph.input, s_inits) != names(teacher.proto.graph.input, t_inits):
        raise InputError("the teacher's inputs differ from the pruned model's "
                         f"({names(teacher.proto.graph.input, t_inits)} vs "
                         f"{names(student.proto.graph.input, s_inits)})")
    if names(student.proto.graph.output) != names(teacher.proto.graph.output):
        raise InputError("the teacher's outputs differ from the pruned model's "
                         f"({names(teacher.proto.graph.output)} vs {names(student.proto.graph.output)})")


def with_values(model: ModelData, values: dict[str, np.ndarray]) -> ModelData:
    """`model` with initializer values replaced; the graph is otherwise untouched. Refuses a value whose
    name is no initializer or whose shape or dtype differs (a bridge must not change the graph)."""
    proto = model.copy_proto()
    weights = dict(model.weights)
    index = {init.name: k for k, init in enumerate(proto.graph.initializer)}
    for name, value in values.items():
        if name not in index:
            raise RuntimeError(f"the bridge returned {name!r}, which is not an initializer of the model")
        init = proto.graph.initializer[index[name]]
        old = weights[name] if is_placeholder(init) else numpy_helper.to_array(init)
        value = np.asarray(value)
        if value.shape != old.shape or value.dtype != old.dtype:
            raise RuntimeError(f"the bridge changed initializer {name!r}: {old.dtype}{list(old.shape)} -> "
                               f"{value.dtype}{list(value.shape)}")
        if is_placeholder(init):
            weights[name] = value
        else:
            init.CopyFrom(numpy_helper.from_array(value, name))
    return ModelData(proto, weights)


def same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Equal except for initializer values (and how they are stored)."""
    def skeleton(m):
        c = onnx.ModelProto()
        c.CopyFrom(m)
        for init in c.graph.initializer:
            dims, dtype, name = list(init.dims), init.data_type, init.name
            init.Clear()
            init.name, init.data_type = name, dtype
            init.dims.extend(dims)
        return c.SerializeToString(deterministic=True)

    return skeleton(a) == skeleton(b)


def split_validation(data: Data, seed: int, fraction: float = 0.1) -> tuple[Data, Data]:
    """A seeded random `fraction` of the samples held out for validation (the whole data when under 10 samples)."""
    n = len(data)
    if n < 10:
        return data, data
    order = np.random.default_rng(seed).permutation(n)
    cut = max(1, int(round(n * fraction)))

    def subset(idx):
        idx = np.sort(idx)
        labels = None if data.labels is None else data.labels[idx]
        return Data({k: v[idx] for k, v in data.inputs.items()}, labels, data.source, data.synthetic)

    return subset(order[cut:]), subset(order[:cut])


def output_errors(models: list[ModelData], reference: ModelData, data: Data, provider: str,
                  batch_size: int = 64) -> list[float]:
    """Σ_outputs ‖y − y_ref‖² / Σ ‖y_ref‖² over `data` for each model, run by onnxruntime
    (the reference once)."""
    from .runtime import Runner

    runners, ref = [Runner(m, provider) for m in models], Runner(reference, provider)
    num, den = np.zeros(len(models)), 0.0
    for feeds in data.batches(batch_size):
        targets = ref.run(feeds)
        den += sum(float(np.square(r, dtype=np.float64).sum()) for r in targets)
        for k, runner in enumerate(runners):
            num[k] += sum(float(np.square(y - r, dtype=np.float64).sum()) for y, r in zip(runner.run(feeds), targets))
    return [float(x) for x in num / max(den, 1e-30)]


class BasePathTuner:
    """Training-time AOFP (the paper's multi-path framework): after each half the search ranks, `steps`
    fine-tuning steps of the base path — the working model with the removed channels masked — and the
    trained values written into the working graph in place, so the next trials see the adapted network.
    The teacher (for distillation) is the model as it was before the search."""

    def __init__(self, cmap, data: Data, steps: int, options: Options, bridge: str = "torch"):
        from .masking import masked_model

        options.check()
        if steps < 1:
            raise InputError(f"--finetune-steps must be at least 1, got {steps}")
        self.graph = cmap.graph
        # Graph.assign replaces weight arrays, never writes into them: a shallow copy keeps the originals
        teacher = ModelData(self.graph.data.copy_proto(), dict(self.graph.weights))
        self.teacher = teacher
        self.mode = resolve_mode("auto", data, teacher, None)
        self.names = set(self.graph.inits)
        self.training = load_bridge(bridge)(Job(masked_model(cmap), teacher, data, None, self.mode, options))
        self.world_size = getattr(self.training, "world_size", 1)
        self.steps, self.halves, self.seconds, self.losses = steps, 0, 0.0, []
        self.device = None

    def __call__(self, keep: np.ndarray) -> None:
        from .masking import KEEP_INPUT, keep_feed

        began = time.perf_counter()
        result = self.training.train(steps=self.steps, constants={KEEP_INPUT: keep_feed(keep)})
        self.graph.assign({k: v for k, v in result.values.items() if k in self.names})
        self.halves += 1
        self.seconds += time.perf_counter() - began
        self.losses.append(result.history[-1].get("train_loss"))
        self.device = result.device

    def to_json(self) -> dict:
        return {"mode": self.mode, "world_size": self.world_size, "steps_per_half": self.steps, "halves": self.halves,
                "steps": self.steps * self.halves, "seconds": self.seconds, "device": self.device,
                "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None}


def start(job: Job, bridge: str = "torch") -> Training:
    """The named bridge started on `job` (under torchrun: this process's part of a data-parallel job)."""
    job.options.check()
    return load_bridge(bridge)(job)


def run(job: Job, bridge: str = "torch") -> Result:
    """Fine-tune `job.student` with the named bridge; the result's values are checked against the graph."""
    result = start(job, bridge).train()
    with_values(job.student, result.values)  # raises if the bridge changed the graph
    return result


__all__ = ["BasePathTuner", "Job", "Options", "Result", "Training", "bridge_names", "check_teacher",
           "launched_processes", "leads", "load_bridge", "output_errors", "release", "resolve_mode", "run",
           "same_graph", "split_validation", "start", "with_values"]
