"""Data parallelism over processes with torch.distributed (``torchrun``): gloo on CPU, nccl on CUDA.

Every rank holds the whole model and takes its contiguous share of each global batch (the batches
themselves are drawn exactly as in one process). A step's loss on a rank is its shard's mean loss
weighted by the shard's share of the batch, so the gradients summed over ranks are the gradient of
the global batch's mean loss; batch norm in training mode uses the statistics of the global batch
(:class:`SyncedBatchNorm`). With the same seed and global batch, N processes therefore take the same
steps as one process, to float rounding (tested with 2 gloo processes). Rank 0 alone writes files.

Not exact across ranks (each differs from one process by its batch-level statistics being taken per
shard): the warm-up regulariser of certified training (mean interval widths), random starts of PGD
and the SDARTS-ADV perturbation (random numbers per rank), and bounds computed by auto_LiRPA in
training mode (L2 certified training). Second-order search runs in one process only.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn

from certnas.errors import CertnasError


class DistributedError(CertnasError):
    """A process group that cannot be set up, or a rank that failed."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run (one process: rank 0 of 1)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""
    device: str = "cpu"  # where this rank's collectives run (nccl takes CUDA tensors only)

    @property
    def main(self) -> bool:
        """True on the rank that writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch's sample indices (sizes differ by at most 1)."""
        if not self.active:
            return index
        return torch.tensor_split(index, self.size)[self.rank]

    def share(self, index: torch.Tensor) -> float:
        """The fraction of the global batch ``index`` that this rank's shard holds."""
        return len(self.shard(index)) / max(len(index), 1)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def sum_gradients(self, parameters: Iterable[torch.Tensor]) -> None:
        """Sum ``.grad`` over ranks in place (one flat all-reduce); parameters without a gradient on
        this rank count as zero, and keep ``grad`` None where it is None on every rank."""
        if not self.active:
            return
        params = list(parameters)
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32,
                               device=params[0].device if params else "cpu")
        if params:
            torch.distributed.all_reduce(present)
        grads = []
        for p, has in zip(params, present.tolist()):
            if has and p.grad is None:
                p.grad = torch.zeros_like(p)
            if has:
                grads.append(p.grad)
        self.sum_tensors(grads)

    def sum_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum each tensor over ranks in place (one flat all-reduce)."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def weighted_means(self, row: Dict[str, float], weight: float) -> Dict[str, float]:
        """The global-batch means of per-shard means ``row`` (each weighted by its shard's ``weight``)."""
        if not self.active or not row:
            return row
        keys = list(row)  # the same order on every rank (the same code made the row)
        values = torch.tensor([row[k] * weight for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(values)
        return dict(zip(keys, values.tolist()))

    def combine(self, parts: Sequence[tuple]) -> Dict[str, float]:
        """Global means from ``(row, weight)`` pairs of per-shard means, where different keys may carry
        different weights (e.g. a metric measured on a share of the samples) and a rank may lack a key."""
        gathered = [part for rank_parts in self.gather_objects(list(parts)) for part in rank_parts]
        totals: Dict[str, float] = {}
        for row, weight in gathered:
            for key, value in row.items():
                totals[key] = totals.get(key, 0.0) + value * weight
        return totals

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        if not self.active:
            return
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                torch.distributed.broadcast(tensor.data, src=0)

    def gather_objects(self, value) -> List:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if not self.active:
            return [value]
        gathered = [None] * self.size
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    @contextlib.contextmanager
    def synchronised_statistics(self) -> Iterator[None]:
        """Within this block, training-mode :class:`SyncedBatchNorm` uses the global batch's statistics
        (every rank must run the same forward passes inside it)."""
        previous = _SYNC.get("world")
        _SYNC["world"] = self if self.active else None
        try:
            yield
        finally:
            _SYNC["world"] = previous


# The one piece of process state here: which world (if any) batch norm synchronises over, set only
# for the duration of World.synchronised_statistics. Batch norm is called deep inside models, so the
# alternative would be threading a handle through every forward signature.
_SYNC: Dict[str, Optional[World]] = {"world": None}


def world_from_environment(device: str) -> World:
    """The world of a ``torchrun`` launch (WORLD_SIZE, RANK, LOCAL_RANK; one process without them),
    joining the process group: gloo for CPU, nccl for CUDA, where ``--device cuda`` (no index) makes
    this rank's current device ``cuda:LOCAL_RANK``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = dev if dev.index is not None else torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not torch.distributed.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("CERTNAS_DIST_TIMEOUT", "1800")))
        try:
            torch.distributed.init_process_group(backend, rank=rank, world_size=size, timeout=timeout)
        except Exception as error:  # noqa: BLE001 - any failure to rendezvous is the user's to act on
            raise DistributedError(f"rank {rank} of {size}: cannot join the process group ({backend}): "
                                   f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    return World(rank=rank, size=size, local_rank=local_rank, backend=backend, device=str(dev))


def finish(world: World) -> None:
    """Leave the process group (after the run's last collective)."""
    if world.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: each rank's input reaches every
    rank's output, so every rank's loss contributes to its gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad


class SyncedBatchNorm(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, in training mode inside :meth:`World.synchronised_statistics`, uses the
    mean and variance of the global batch (sums all-reduced with their gradients), also when the
    interval engine bounds it. Elsewhere it is plain batch norm; eval mode uses the running statistics,
    which every rank updates identically."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world = _SYNC.get("world")
        if world is None or not self.training:
            return super().forward(x)
        from verifiers.interval import clean_value, normalise_channels, update_running_statistics
        value = clean_value(x)
        dims = [0] + list(range(2, value.dim()))
        count = torch.tensor([value.numel() / value.shape[1]], dtype=value.dtype, device=value.device)
        local = torch.cat([value.sum(dims), (value * value).sum(dims), count])
        total = _SumOverRanks.apply(local)
        channels = value.shape[1]
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels:2 * channels] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            update_running_statistics(self.running_mean, self.running_var, mean, var, n, momentum)
        return normalise_channels(x, mean, var, self.weight, self.bias, self.eps)


def synchronise_batch_norm(model: nn.Module) -> nn.Module:
    """Make every ``nn.BatchNorm2d`` of ``model`` a :class:`SyncedBatchNorm` in place (same parameters,
    buffers and state-dict keys; behaviour unchanged outside synchronised_statistics)."""
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = SyncedBatchNorm
    return model
