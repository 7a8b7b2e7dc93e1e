"""What a started run consists of (built by train.setup, driven by loop.Trainer), and its collectives.

Kept apart from train.py so the throughput benchmark and tests can drive the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from roberta_ds.config import TrainConfig
from roberta_ds.dist import DistEnv
from roberta_ds.ds_config import BatchPlan
from roberta_ds.optim import GuardedAdamW


@dataclass
class Runtime:
    cfg: TrainConfig
    ds: dict[str, Any]
    """The DeepSpeed config as given to deepspeed.initialize."""
    plan: BatchPlan
    env: DistEnv
    device: torch.device
    engine: Any
    optimizer: GuardedAdamW
    data: Any
    """data.TrainData"""
    tokenizer_sha256: str
    step: int
    """Optimizer steps done (skipped ones included): the data cursor is step x global batch."""
    skipped_total: int
    out: Path
    rng_state: dict[str, Any] | None
    """This rank's RNG states from the checkpoint, restored just before the first step."""


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
