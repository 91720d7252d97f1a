"""Data-parallel training across processes (``torchrun``): the process group and the few collectives.

    torchrun --nproc_per_node=G -m risloc train --config configs/default.toml --out runs/ddp

The trainer (:func:`risloc.nn.train.train`) asks :func:`session` for a :class:`Dist`. Started by
``torchrun`` (``WORLD_SIZE`` > 1 in the environment) it joins the process group — backend
``nccl`` with device ``cuda:LOCAL_RANK`` when the run is on CUDA, ``gloo`` on the CPU — with a
finite timeout, and always leaves it in a ``finally`` (``destroy_process_group``), also when
training raises. Anywhere else it yields a single-process :class:`Dist` whose collectives do
nothing, so ``python -m risloc train`` runs exactly the code it always ran.

Everything the trainer needs from the other ranks goes through :class:`Dist`:

* ``any_(flag)``: whether a host flag is set on any rank (one MAX all-reduce; the time-budget
  stop, checked every few steps). The gradient gate needs no collective: it decides on the
  already averaged, hence identical, gradients (:func:`risloc.nn.train.gated_step`);
* ``average_(tensors)``: in-place mean over ranks (running loss-term magnitudes, epoch sums);
* ``broadcast(obj)``: rank 0's Python object to every rank (the epoch's validation record and
  the continue/stop decision; the only wait of ranks 1.. for rank 0's validation);
* ``gather(obj)``: every rank's object on every rank (per-rank parameter digests);
* ``barrier()``.

The environment is read, never written (``NCCL_NVLS_ENABLE=0`` and friends are respected).
See docs/training-at-scale.md.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as torch_dist
from torch import Tensor

from .._devices import check_device

DEFAULT_TIMEOUT_S = 1800.0
"""Default collective timeout (s). Ranks 1.. wait this long for rank 0's validation and
calibration; a rank that died makes the others fail after it instead of hanging forever."""


@dataclass
class Dist:
    """This process's place in the job (world 1: a single process, every collective a no-op)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any_(self, flag: bool) -> bool:
        """``True`` iff ``flag`` is set on some rank (one MAX all-reduce and a host read)."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([int(flag)], device="cuda" if self.backend == "nccl" else "cpu")
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item())

    def average_(self, tensors: list[Tensor]) -> None:
        """Replace each tensor (same shapes on every rank) by its mean over ranks, in place."""
        if not self.enabled or not tensors:
            return
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
        flat /= self.world
        a = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[a : a + n].view_as(t))
            a += n

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        torch_dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()


def launched_by_torchrun() -> bool:
    """Whether the environment describes a job of several processes (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def device_for(name: str, dist: Dist) -> torch.device:
    """The training device of this rank: ``name`` ('auto' = cuda if available, else cpu),
    with the CUDA index replaced by ``LOCAL_RANK`` under ``torchrun`` (one GPU per process)."""
    if name == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        kind = check_device(name, "TrainConfig.device =").type
    if not dist.enabled:
        return torch.device(name if name != "auto" else kind)
    if kind == "cuda":  # available: checked above
        if dist.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {dist.local_rank} but only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


@contextmanager
def session(device_name: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[tuple[Dist, torch.device]]:
    """``(dist, device)`` for a training run; joins and finally leaves the process group under torchrun.

    Backend ``nccl`` when the run's device is CUDA (``torch.cuda.set_device(LOCAL_RANK)`` first),
    ``gloo`` on the CPU; ``timeout_s`` bounds every collective, so a crashed or stuck rank ends
    the others with an error instead of a hang (``torchrun`` also stops the remaining workers
    as soon as one exits with an error).
    """
    if not launched_by_torchrun():
        dist = Dist()
        yield dist, device_for(device_name, dist)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    probe = Dist(rank=rank, world=world, local_rank=local)
    device = device_for(device_name, probe)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if torch_dist.is_initialized():  # someone else (a test harness) set it up: use it, leave it alone
        yield Dist(rank, world, local, torch_dist.get_backend()), device
        return
    torch_dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    finished = False
    try:
        yield Dist(rank, world, local, backend), device
        finished = True
    finally:
        # DDP wrappers sit in reference cycles: free their reducers while the group still exists
        # (destroyed later, at interpreter exit, a gloo reducer can abort the process with
        # "terminate called without an active exception").
        gc.collect()
        if finished:
            torch_dist.barrier()  # no rank tears down while another still talks to it
        torch_dist.destroy_process_group()


def parameter_digest(module: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of a module's parameters' bytes, in order (ranks must agree bitwise)."""
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
