"""Data-parallel fine-tuning under torchrun: the process group, the sample shards, and the leader's commands.

torchrun starts N copies of the command with RANK, LOCAL_RANK and WORLD_SIZE set. `World.join`
initializes the default process group from them (NCCL when training on CUDA, each process on GPU
LOCAL_RANK; gloo on CPU); without torchrun (WORLD_SIZE unset or 1) it is a one-process world and
nothing is initialized. The student is wrapped in DistributedDataParallel, which averages the
gradients over the processes after every backward pass, so the N copies of the weights stay equal.

A step of batch size B takes ⌈B/N⌉ samples on each process from its shard (a DistributedSampler
over the sample indices, reshuffled every pass with the seed and the pass number), so N processes
take the same number of steps on about the same global batch as one process: the same hyper-parameters
give the same training, each process computing 1/N of it. Validation sums are all-reduced.

Rank 0 leads: only it runs the search of training-time AOFP and writes the result. Every call of
`train` is mirrored on the others through `Leader.command` (rank 0 broadcasts what to run, the
followers' `serve` loop runs the same call), and `close` releases them once rank 0 has written. If
a process fails, torchrun stops the others (and says which rank failed).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import InputError

STOP = "stop"


@dataclass(frozen=True)
class World:
    """This process's place in the job; what the user's `--trainer` receives as `distributed=`."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None  # "gloo" or "nccl"; None in one process
    device: str = "cpu"

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def group(self):
        """The torch process group (the default one), or None in one process."""
        return dist.group.WORLD if self.world_size > 1 else None

    @staticmethod
    def join(device: torch.device) -> "World":
        """The world torchrun describes in the environment, its process group initialized (once)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return World(device=str(device))
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            if local >= torch.cuda.device_count():
                raise InputError(f"torchrun process {local} of this node has no GPU of its own (torch sees "
                                 f"{torch.cuda.device_count()}); start at most that many, or use --device cpu")
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
        return World(rank, local, size, backend, str(device))

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` in DistributedDataParallel (itself in one process). Parameters that a handler reads
        as numbers get no gradient: the graph is static, so DDP learns once which parameters are used."""
        if self.world_size == 1:
            return module
        ids = [self.local_rank] if self.device.startswith("cuda") else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, static_graph=True)

    def local_batch(self, batch_size: int) -> int:
        return -(-batch_size // self.world_size)

    def shard(self, n: int, seed: int, epoch: int) -> list[int]:
        """This process's sample indices for pass `epoch` over n samples (all of them, permuted, in one process)."""
        sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=self.world_size, rank=self.rank,
                                                      shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj):
        """Rank 0's `obj` on every process."""
        if self.world_size == 1:
            return obj
        box = [obj if self.leader else None]
        dist.broadcast_object_list(box, src=0, device=torch.device(self.device) if self.backend == "nccl" else None)
        return box[0]


class Leader:
    """Rank 0 tells the followers which `train` call to mirror; they loop in `serve` until `close`."""

    def __init__(self, world: World):
        self.world = world
        self.closed = world.world_size == 1

    def command(self, steps, constants) -> None:
        if self.world.world_size > 1 and self.world.leader:
            self.world.broadcast(("train", steps, constants))

    def serve(self, train) -> None:
        """Followers: run every `train(steps, constants)` rank 0 runs, until it closes."""
        while True:
            kind, *args = self.world.broadcast(None)
            if kind == STOP:
                self._end()
                return
            train(*args, mirrored=True)

    def close(self) -> None:
        """Rank 0: release the followers (after writing); every process leaves the group."""
        if self.closed:
            return
        if self.world.leader:
            self.world.broadcast((STOP,))
        self._end()

    def _end(self) -> None:
        self.closed = True
        if dist.is_initialized():
            dist.destroy_process_group()
