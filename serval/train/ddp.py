"""Running on many processes (torchrun, DDP): the process group, gathers and barriers.

With one process every helper is the identity, so the loop reads the same either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Dist:
    """This process's place among the ranks."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None) -> tuple[Dist, torch.device]:
    """Join the process group torchrun set up (RANK/WORLD_SIZE env), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device is None:
        device = f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:  # "cuda": this process's GPU
            dev = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist, dev


def gather_with_grad(x: Tensor, dist: Dist) -> Tensor:
    """Concatenate `x` over ranks, with gradients flowing back to every rank's own piece."""
    if dist.world == 1:
        return x
    import warnings

    from torch.distributed.nn.functional import all_gather

    # deprecated, but still the differentiable all-gather that works with gloo
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_tensor(x: Tensor, dist: Dist) -> Tensor:
    """Concatenate `x` over ranks, without gradients (targets)."""
    if dist.world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def pad_rows(x: Tensor, n: int) -> Tensor:
    """`x` with zero rows appended up to `n` rows."""
    return torch.cat([x, x.new_zeros((n - len(x), *x.shape[1:]))]) if len(x) < n else x


def gather_objects(obj, dist: Dist) -> list:
    """`obj` of every rank, in rank order (picklable objects)."""
    if dist.world == 1:
        return [obj]
    out = [None] * dist.world
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier(dist: Dist) -> None:
    """Wait for every rank."""
    if dist.world > 1:
        torch.distributed.barrier()
