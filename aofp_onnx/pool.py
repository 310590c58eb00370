"""Several onnxruntime sessions of one model, one per device, sharing each stacked run between them.

`--devices` names the sessions: a comma-separated list of `cuda:K` (GPU K; `cuda` is `cuda:0`) and
`cpu` (one CPU session; `cpu,cpu` two of them, the cores split evenly between the CPU sessions).
A `RunnerPool` runs like a `runtime.Runner`, except that the rows of one input (`split`, axis 0)
are dealt out in contiguous blocks, one per session, run concurrently (onnxruntime releases the GIL
while a session runs) and the outputs concatenated back in row order.

This is exact when every output row depends only on its own rows of `split` and on the other
inputs, as the trial graph's damage rows do (row t is the damage of trial t: its stacked consumer
copies and its norms see only block t). Each session then computes the same numbers as one session
would: the search draws the same trials and makes the same decisions, so the plan is the one a single
device gives under the same seed; only the wall time changes. The calibration batch and the base
path are run by every session (the base is what every trial is compared to), so the trials, not the
base forward, are what divides by the number of devices.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .runtime import Runner

_ENTRY = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "cuda"
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


def parse_devices(text: str) -> list[Device]:
    """`cuda:0,cuda:1` or `cpu,cpu` → the devices, one session each; refuses anything else with a reason."""
    entries = [e.strip().lower() for e in (text or "").split(",")]
    devices = []
    for entry in entries:
        m = _ENTRY.match(entry)
        if not m or (m.group(1) == "cpu" and m.group(2) is not None):
            raise InputError(f"--devices: {entry!r} is not a device; use cuda:K (one session on GPU K) or cpu "
                             "(one CPU session), comma-separated, e.g. cuda:0,cuda:1 or cpu,cpu")
        devices.append(Device(m.group(1), int(m.group(2) or 0)))
    gpus = [d for d in devices if d.kind == "cuda"]
    if len(set(gpus)) != len(gpus):
        raise InputError(f"--devices {text}: a GPU is named twice (one session per GPU)")
    return devices


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class RunnerPool:
    """One `Runner` per device over the same model; `run` splits input `split` along axis 0 between them."""

    def __init__(self, model, devices: list[Device], split: str):
        if not devices:
            raise InputError("--devices: no device given")
        cpus = sum(d.kind == "cpu" for d in devices)
        threads = max(1, _cores() // cpus) if cpus > 1 else None
        self.runners = [self._runner(model, d, threads) for d in devices]
        self.devices = list(devices)
        self.split = split
        self.provider = self.runners[0].provider
        self.outputs = self.runners[0].outputs
        self._workers = ThreadPoolExecutor(len(self.runners), thread_name_prefix="aofp-trials")

    @staticmethod
    def _runner(model, device: Device, threads: int | None) -> Runner:
        if device.kind == "cpu":
            return Runner(model, "cpu", threads=threads)
        try:
            runner = Runner(model, "cuda", device_id=device.index)
        except InputError:
            raise InputError(f"--devices {device}: onnxruntime cannot run a CUDA session here (missing CUDA/cuDNN "
                             "libraries or no GPU); name cpu sessions instead") from None
        except Exception as exc:  # onnxruntime refuses a device id it does not have
            raise InputError(f"--devices {device}: onnxruntime cannot open a session there "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        return runner

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        """What one session gives for `feeds`, the rows of `feeds[split]` shared out between the sessions."""
        rows = feeds[self.split]
        blocks = [b for b in np.array_split(np.arange(len(rows)), len(self.runners)) if len(b)]
        jobs = [self._workers.submit(runner.run, {**feeds, self.split: rows[b[0]:b[-1] + 1]}, outputs)
                for runner, b in zip(self.runners, blocks)]
        parts = [job.result() for job in jobs]
        return [np.concatenate([p[k] for p in parts], axis=0) for k in range(len(parts[0]))]
