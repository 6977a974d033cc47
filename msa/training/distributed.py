"""Running under torchrun: the rank a process is, and its process group (torch.distributed).

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; a stage that sees WORLD_SIZE > 1 does its
share and meets the others at barriers. gloo on CPU, nccl on CUDA."""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch

from msa.core.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Rank:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


ALONE = Rank(0, 1, 0)  # a process run by itself: rank 0 of 1, so code written for ranks needs no branch


def current_rank() -> Rank:
    """This process's place under torchrun; ALONE when run by itself."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ALONE
    return Rank(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def join(rank: Rank, device: str) -> str:
    """Join the process group; returns the device this rank uses (cuda:LOCAL_RANK, or the CPU)."""
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(rank.local_rank)
    if not torch.distributed.is_initialized():
        # A rank that dies leaves the others waiting at a barrier: they give up after this long.
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return "cuda" if use_cuda else "cpu"


def barrier() -> None:
    if torch.distributed.is_initialized():  # alone, there is no one to wait for
        torch.distributed.barrier()


def every_rank_ok(ok: bool, device: str) -> bool:
    """Whether every rank says ok: one rank's failure stops all of them now, where a barrier
    would keep the others waiting for the group's 30-minute timeout."""
    return int(summed_over_ranks(torch.tensor([0 if ok else 1]), device).item()) == 0


def summed_over_ranks(values: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The sum of `values` over every rank (on the CPU): an all-reduce on the group's device
    (join's: cuda or cpu)."""
    if not torch.distributed.is_initialized():  # alone: the sum over one rank
        return values.cpu()
    on_device = values.to(device)
    torch.distributed.all_reduce(on_device)
    return on_device.cpu()


def single_process_only(command: str) -> None:
    """Stop a stage that does not share its work before its ranks race for the same files."""
    rank = current_rank()
    if rank.distributed:
        raise ConfigError(f"msa {command} does not share its work across torchrun's {rank.world_size} processes: "
                          "run it as one process (extract, caption and finetune run under torchrun)")
