"""The PyTorch bridge's fine-tuning: `start(job)` for `aofp_onnx.finetune` (entry point ``torch``).

The student is an `OnnxModule` of the pruned graph; its parameters are exactly the graph's float
initializers, so the values handed back fit the same graph. Losses (see `aofp_onnx.finetune`):
distillation Σ_o ‖s_o − t_o‖² / ‖t_o‖² against the teacher (an `OnnxModule` of the original, in
eval mode, without gradients), or cross-entropy of the first output against the labels. Adam with a
cosine learning-rate decay over the planned steps. With epochs, the model is scored on the validation
data before training and after every epoch; the best state so far is kept and handed back (so a
fine-tuning that only hurts returns the starting values).

Under torchrun the training is data-parallel (`bridge.distributed`): DistributedDataParallel over
gloo (CPU) or NCCL (CUDA), each process on its shard of the samples, validation sums all-reduced.
"""
from __future__ import annotations

import importlib
import inspect
import math
import sys

import numpy as np
import torch
from onnx import helper

from ..calib import Data
from ..errors import InputError
from ..finetune import Job, Result
from .distributed import Leader, World
from .executor import OnnxModule


def start(job: Job) -> "TorchTraining":
    return TorchTraining(job)


def pick_device(wanted: str) -> torch.device:
    if wanted == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: torch sees no CUDA device")
    return torch.device("cuda" if wanted in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


class TorchTraining:
    def __init__(self, job: Job):
        self.job, opts = job, job.options
        torch.manual_seed(opts.seed)
        self.rng = np.random.default_rng(opts.seed)
        self.world = World.join(pick_device(opts.device))
        self.device = torch.device(self.world.device)
        self.rank, self.world_size = self.world.rank, self.world.world_size
        self.leader = Leader(self.world)
        self.student = OnnxModule(job.student, bn=opts.bn).to(self.device)
        self.model = self.world.wrap(self.student)  # what training runs (DDP under torchrun)
        self.teacher = None
        if job.mode == "distill":
            self.teacher = OnnxModule(job.teacher).to(self.device).eval()
            self.teacher.requires_grad_(False)
        # scalar constants (a folded hard-swish's 3 and 6, a GELU's √2) are part of the op, not weights
        self.params = [p for p in self.student.parameters() if p.requires_grad and p.ndim > 0]
        self.optimizer = torch.optim.Adam(self.params, lr=opts.lr)
        self._order: list[int] = []
        self._passes = 0
        self.constants = dict(job.constants)  # extra inputs fed as they are (train() may replace them)

    # -- data -------------------------------------------------------------------------------------
    def _next_indices(self) -> np.ndarray:
        """The next training batch of a reshuffled pass over the data (a pass restarts when used up)."""
        n, bs = len(self.job.data), min(self.job.options.batch_size, len(self.job.data))
        if self.world_size > 1:  # this process's ⌈B/N⌉ samples, from its shard of the pass
            bs = min(self.world.local_batch(bs), -(-n // self.world_size))
            if len(self._order) < bs:
                self._order = self.world.shard(n, self.job.options.seed, self._passes)
                self._passes += 1
        elif len(self._order) < bs:
            self._order = list(self.rng.permutation(n))
        take, self._order = self._order[:bs], self._order[bs:]
        return np.asarray(take)

    def _feeds(self, data: Data, idx: np.ndarray) -> dict[str, torch.Tensor]:
        feeds = {k: torch.as_tensor(v[idx], device=self.device) for k, v in data.inputs.items()}
        feeds.update({k: torch.as_tensor(v, device=self.device) for k, v in self.constants.items()})
        return feeds

    # -- losses -----------------------------------------------------------------------------------
    def _loss(self, outputs: tuple[torch.Tensor, ...], data: Data, idx: np.ndarray) -> torch.Tensor:
        """The job's loss of the student's `outputs` on samples `idx` of `data`."""
        if self.job.mode == "supervised":
            logits = outputs[0].reshape(len(idx), outputs[0].shape[1], -1).squeeze(-1)
            labels = torch.as_tensor(data.labels[idx], device=self.device).long()
            return torch.nn.functional.cross_entropy(logits, labels)
        with torch.no_grad():
            targets = self.teacher(**{k: torch.as_tensor(v[idx], device=self.device) for k, v in data.inputs.items()})
        return sum(((s - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-12) for s, t in zip(outputs, targets))

    @torch.no_grad()
    def score(self, data: Data) -> dict:
        """Validation: mean loss, and accuracy when the data has labels (model in eval mode); each
        process scores every N-th sample and the sums are all-reduced."""
        self.student.eval()
        loss, correct = 0.0, 0
        bs = self.job.options.batch_size
        mine = np.arange(self.rank, len(data), self.world_size)
        for s in range(0, len(mine), bs):
            idx = mine[s:s + bs]
            outputs = self.student(**self._feeds(data, idx))
            loss += float(self._loss(outputs, data, idx)) * len(idx)
            if data.labels is not None:
                predicted = outputs[0].reshape(len(idx), -1).argmax(1).cpu().numpy()
                correct += int((predicted == data.labels[idx]).sum())
        loss, correct = self.world.all_sum([loss, correct])
        out = {"val_loss": loss / len(data)}
        if data.labels is not None:
            out["val_accuracy"] = int(correct) / len(data)
        return out

    def _better(self, a: dict, b: dict | None) -> bool:
        if b is None:
            return True
        if "val_accuracy" in a and self.job.mode != "distill":
            return a["val_accuracy"] > b["val_accuracy"]
        return a.get("val_loss", 0.0) < b.get("val_loss", 0.0)

    # -- training ---------------------------------------------------------------------------------
    def _steps(self, n: int, total: int, done: int, show) -> float:
        """`n` optimizer steps (cosine learning rate over `total` steps, `done` already taken); mean loss."""
        self.student.train()
        lr0, losses = self.job.options.lr, []
        for k in range(n):
            for group in self.optimizer.param_groups:
                group["lr"] = lr0 * 0.5 * (1 + math.cos(math.pi * (done + k) / max(total, 1)))
            idx = self._next_indices()
            loss = self._loss(self.model(**self._feeds(self.job.data, idx)), self.job.data, idx)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss.detach()))
            if show:
                show(done + k + 1, total, losses[-1])
        return float(np.mean(losses)) if losses else float("nan")

    def values(self) -> dict[str, np.ndarray]:
        """A copy of every initializer's current value, in the model's dtypes (on CPU `.numpy()` is a view of
        the live parameter, which the next optimizer step would change)."""
        out = {}
        for init in self.job.student.proto.graph.initializer:
            tensor = self.student.parameter_for(init.name).detach().cpu().numpy()
            out[init.name] = np.array(tensor, dtype=helper.tensor_dtype_to_np_dtype(init.data_type), copy=True)
        return out

    def train(self, steps: int | None = None, constants: dict[str, np.ndarray] | None = None, *,
              mirrored: bool = False) -> Result:
        """`steps` optimizer steps (no validation), or the job's epochs with the best state kept. Under
        torchrun rank 0 calls it and the other processes run the same call in `serve`."""
        if not mirrored:
            self.leader.command(steps, constants)
        self.constants = dict(self.job.constants if constants is None else constants)
        opts = self.job.options
        if self.job.mode == "trainer":
            return self._user_trainer()
        if steps is not None:
            loss = self._steps(steps, steps, 0, None)
            return self._result(self.values(), [{"steps": steps, "train_loss": loss}])
        per_epoch = math.ceil(len(self.job.data) / opts.batch_size)
        total = opts.steps or opts.epochs * per_epoch
        epochs = math.ceil(total / per_epoch)
        show = _progress(opts.progress and self.world.leader)
        val = self.job.val or self.job.data
        best = {"epoch": 0, **self.score(val)}
        best_values, history, done = self.values(), [dict(best)], 0
        for epoch in range(1, epochs + 1):
            n = min(per_epoch, total - done)
            loss = self._steps(n, total, done, show)
            done += n
            entry = {"epoch": epoch, "train_loss": loss, **self.score(val)}
            history.append(entry)
            if self._better(entry, best):
                best, best_values = entry, self.values()
        if show:
            sys.stderr.write("\n")
        return self._result(best_values, history, best)

    def _result(self, values, history, best=None) -> Result:
        return Result(values, str(self.device), history, best, world_size=self.world_size)

    def serve(self) -> None:
        """Processes other than rank 0: mirror its `train` calls until it closes."""
        self.leader.serve(self.train)

    def close(self) -> None:
        """Release the other processes (rank 0, once written) and leave the process group."""
        self.leader.close()

    def _user_trainer(self) -> Result:
        fn = load_trainer(self.job.options.trainer)
        extra = {"teacher": self.teacher, "options": self.job.options, "device": self.device,
                 "distributed": self.world}
        accepted = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in extra.items() if k in accepted}
        self.student.train()
        fn(self.student, self.job.data, **kwargs)
        return self._result(self.values(), [{"trainer": self.job.options.trainer}])


def load_trainer(spec: str):
    """`module:function` (the current folder is importable), checked to be callable."""
    module_name, _, attr = (spec or "").partition(":")
    if not module_name or not attr:
        raise InputError(f"--trainer must be module:function, got {spec!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"--trainer {spec}: {exc}") from None
    if not callable(fn):
        raise InputError(f"--trainer {spec}: not a function")
    return fn


def _progress(enabled: bool):
    if not enabled:
        return None
    tty = sys.stderr.isatty()

    def show(step: int, total: int, loss: float):
        line = f"finetune: step {step}/{total}, loss {loss:.4g}"
        if tty:
            sys.stderr.write("\r" + line + " " * 8)
            sys.stderr.flush()
        elif step % 50 == 0 or step == total:
            sys.stderr.write(line + "\n")

    return show
