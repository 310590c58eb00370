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
`train` is mirrored on the others through `Leader.command` (rank 0 posts what to run under the next
numbered key of the job's store, the followers' `serve` loop reads it and runs the same call), and
`close` releases them once rank 0 has written. If a process fails, torchrun stops the others (and
says which rank failed).

Why the store and not a broadcast: gloo's worker thread drops its reference to a finished collective's
tensors after the caller has moved on, and dropping a tensor made in Python takes the GIL. When the
last thing a process did was a collective (the "stop" broadcast), it could reach interpreter shutdown
first, and the worker, taking the GIL during finalization, aborted the process ("terminate called
without an active exception"; 3 runs in 10 on 2 cores, torch 2.13). A store read holds no tensor and
waits with the GIL released, so the followers sit in it while rank 0 writes, and every collective's
tensors are long released when a process exits.
"""
from __future__ import annotations

import datetime
import itertools
import os
import pickle
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import InputError

STOP = "stop"
TIMEOUT = datetime.timedelta(hours=2)  # a follower waits on rank 0's search and writing
_JOINS = itertools.count()  # worlds joined in this process: each takes its own keys in the store


@dataclass(frozen=True)
class World:
    """This process's place in the job; what the user's `--trainer` receives as `distributed=`."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None  # "gloo" or "nccl"; None in one process
    device: str = "cpu"
    store: dist.Store | None = field(default=None, repr=False, compare=False)  # the job's, under our prefix

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
        if dist.is_initialized():
            raise InputError("a torch process group is already initialized in this process; aofp-onnx starts "
                             "its own from torchrun's environment")
        try:
            store, _, _ = next(dist.rendezvous("env://", timeout=TIMEOUT))
        except ValueError as exc:  # WORLD_SIZE set by hand, without the rest of torchrun's environment
            raise InputError(f"WORLD_SIZE={size} asks for {size} processes, but {exc}; start the command with "
                             "torchrun, or unset WORLD_SIZE") from None
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=TIMEOUT)
        prefix = f"aofp-onnx/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{next(_JOINS)}/"
        return World(rank, local, size, backend, str(device), dist.PrefixStore(prefix, store))

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


class Leader:
    """Rank 0 posts each `train` call to mirror under key `cmd/<k>` of the store; the followers read the
    keys in order in `serve` until the "stop" that `close` posts."""

    def __init__(self, world: World):
        self.world = world
        self.closed = world.world_size == 1
        self.posted = itertools.count()

    def command(self, steps, constants) -> None:
        if self.world.world_size > 1 and self.world.leader:
            self._post(("train", steps, constants))

    def serve(self, train) -> None:
        """Followers: run every `train(steps, constants)` rank 0 runs, until it closes."""
        for k in itertools.count():
            kind, *args = pickle.loads(self.world.store.get(f"cmd/{k}"))
            if kind == STOP:
                self._end()
                return
            train(*args, mirrored=True)

    def close(self) -> None:
        """Rank 0: release the followers (after writing); every process leaves the group."""
        if self.closed:
            return
        if self.world.leader:
            self._post((STOP,))
        self._end()

    def _post(self, command) -> None:
        self.world.store.set(f"cmd/{next(self.posted)}", pickle.dumps(command))

    def _end(self) -> None:
        self.closed = True
        if dist.is_initialized():
            dist.destroy_process_group()
