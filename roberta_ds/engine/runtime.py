"""What a started run consists of (built by engine/setup.py, driven by engine/trainer.Trainer), and
two process-group settings setup applies.

Kept apart from setup.py so the throughput benchmark and tests can drive the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from roberta_ds.comm import Comm
from roberta_ds.config import TrainConfig
from roberta_ds.data.order import DataOrder
from roberta_ds.data.sampling import BatchPlan
from roberta_ds.engine.optim import GuardedAdamW
from roberta_ds.engine.resolved import ResolvedRun
from roberta_ds.launch.dist import DistEnv


@dataclass(kw_only=True)
class Runtime:
    """A started run: what was decided (`run`), the objects built from it, and the counters the
    trainer advances."""

    run: ResolvedRun
    ds: dict[str, Any]
    """The DeepSpeed config as given to deepspeed.initialize."""
    engine: Any
    optimizer: GuardedAdamW
    data: Any
    """data.TrainData"""
    data_identity: dict[str, Any]
    """What fixes the sample order (data/order.data_identity), computed once at setup; every checkpoint
    records it for the resume guard."""
    step: int
    """Optimizer steps done (skipped ones included): the data cursor is step x global batch."""
    skipped_total: int
    rng_state: dict[str, Any] | None
    """This rank's RNG states from the checkpoint, restored just before the first step."""
    tokens_seen: int | None = 0
    """Real (non-padding) tokens consumed by every rank so far; None after resuming from a checkpoint
    that predates the count (it is then not reported)."""
    order: DataOrder = DataOrder()
    """Which global batch each step takes (data/order.py): restarted by --allow-data-change, with
    batches skipped by a spike rollback."""
    spike_state: dict[str, Any] | None = None
    """The spike policy's state from the checkpoint resumed from (spike.SpikeGuard.state())."""

    # What was decided, under the names the trainer reads.
    @property
    def cfg(self) -> TrainConfig:
        return self.run.cfg

    @property
    def plan(self) -> BatchPlan:
        return self.run.plan

    @property
    def env(self) -> DistEnv:
        return self.run.env

    @property
    def device(self) -> torch.device:
        return self.run.device

    @property
    def out(self) -> Path:
        return self.run.out

    @property
    def tokenizer_sha256(self) -> str:
        return self.run.tokenizer.sha256


def release_shm_buffers(rank: int) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer from /dev/shm once every local rank has mapped it.

    DeepSpeed's CPU communication op creates `/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_
    <rank>` (~69 MB each) when all ranks share a node, maps its peers' buffers, and never unlinks any:
    every CPU run, and every run that is killed, leaves them in RAM until reboot (a CI machine fills
    up). Unlinked after a barrier, the mappings stay valid and the memory goes with the last process.
    A no-op where there is no such file (GPUs, several nodes).
    """
    import contextlib
    import os

    Comm().barrier()  # now every rank has mapped every buffer (DeepSpeed's init waits for it)
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path("/dev/shm") / name)


def set_default_collective_timeout(timeout: timedelta) -> None:
    """Make `timeout` the default of every process group created from now on, not only the world's.

    `init_process_group(timeout=...)` covers the default group only. DeepSpeed runs ZeRO's gradient
    reduction and parameter gathers in groups of its own (`new_group` without a timeout, e.g. its
    clone of the world group), which torch gives its built-in default (30 minutes for gloo, 10 for
    NCCL): a hung rank would stall the others there far beyond collective_timeout_s. Call this
    before deepspeed.init_distributed.
    """
    from torch.distributed import constants, distributed_c10d

    for module in (constants, distributed_c10d):
        for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
            if getattr(module, name, None) is not None:
                setattr(module, name, timeout)
