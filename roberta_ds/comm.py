"""Every collective call of ours: the checkpoint protocol's (`Comm`) and the trainer's tensor reductions.

Collectives are made by all ranks, in the same order; keeping them in one module makes that easy to
check. Each works in a single process without torch.distributed (world 1), so unit tests run them
in one process. DeepSpeed's own collectives (gradient reduce, parameter gather) stay inside the
engine; `engine/comm_report.py` measures them.
"""

from __future__ import annotations

from typing import Any

import torch

from roberta_ds.errors import CheckpointError


class Comm:
    """The few collectives checkpointing needs; world 1 without torch.distributed is allowed."""

    def __init__(self) -> None:
        self.on = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if self.on else 0
        self.world = torch.distributed.get_world_size() if self.on else 1

    @classmethod
    def single(cls) -> Comm:
        """This process alone (for work one rank does by itself)."""
        c = cls()
        c.on, c.rank, c.world = False, 0, 1
        return c

    def barrier(self) -> None:
        if self.on:
            torch.distributed.barrier()

    def gather_to_all(self, obj: Any) -> list[Any]:
        if not self.on:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def agree_error(self, error: str | None) -> None:
        """Raise the first rank's error on every rank (so all ranks stop together, same message)."""
        errors = [e for e in self.gather_to_all(error) if e]
        if errors:
            raise CheckpointError(errors[0])


def comm_device(device: torch.device) -> torch.device:
    """Where collectives' tensors live: the GPU with NCCL, the CPU with gloo."""
    return device if device.type == "cuda" else torch.device("cpu")


def all_reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t


def make_all_reduce_max(device: torch.device):
    """The callback GuardedAdamW uses to agree on skipping (the flag may live on another device)."""
    target = comm_device(device)

    def reduce_max(flag: torch.Tensor) -> None:
        t = flag.to(target)
        all_reduce(t, torch.distributed.ReduceOp.MAX)
        flag.copy_(t.to(flag.device))

    return reduce_max
