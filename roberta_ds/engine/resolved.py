"""The run, decided once: what the configs and the place the process runs imply, in one frozen object.

    run = resolve_run(args)             # before any process group exists
    run.cfg.model.attention_kernel      # "sdpa" or "varlen", never "auto"
    run.plan.global_batch               # micro x accumulation x world, multiplied out here only

Setup (setup.py) builds the model, the loader and the trainer from these fields; none of them
derives any of it again. The attention kernel and the padding-free layout are one choice, made here
for the device and precision the run has, so the model and the loader (which packs rows when
`unpad`) agree. DeepSpeed's own reading of the batch is compared with `plan` after initialize.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from roberta_ds.config import TrainConfig, resolve_auto
from roberta_ds.config_load import load_train_config
from roberta_ds.data.sampling import BatchPlan
from roberta_ds.data.tokenizer import TokenizerInfo, load_tokenizer_info, tokenizer_vocab_size
from roberta_ds.engine.ds_config import (
    batch_plan,
    check_precision_runs,
    load_ds_config,
    precision,
    zero_stage,
)
from roberta_ds.errors import ConfigError
from roberta_ds.launch import dist
from roberta_ds.launch.dist import DistEnv


@dataclass(frozen=True, kw_only=True)
class ResolvedRun:
    cfg: TrainConfig
    """The training config; its model's attention_kernel and unpad are decided (never "auto")."""
    ds: dict[str, Any]
    """The DeepSpeed config as loaded and overridden (setup adds what initialize and resume need)."""
    env: DistEnv
    expected_world: int | None
    """The world size the launcher announced before export_env rewrote the variables (dist.check_world)."""
    plan: BatchPlan
    precision: str
    """"fp32", "bf16", "fp16" or "autocast-<dtype>" (ds_config.precision)."""
    zero_stage: int
    device: torch.device
    backend: str
    """"nccl" on CUDA, else "gloo"."""
    tokenizer: TokenizerInfo
    """The run's tokenizer: every shard set and the checkpoint resumed from must carry its fingerprint."""

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The training config of `args` (--config, --set, --output-dir, --ds-config), with its two
    required paths present."""
    overrides = list(args.set)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.ds_config:
        overrides.append(f"ds_config={args.ds_config}")
    cfg = load_train_config(args.config, overrides, vocab_size_of=tokenizer_vocab_size)
    if not cfg.tokenizer:
        raise ConfigError("tokenizer: not set; give the tokenizer directory (--set tokenizer=DIR)")
    if not cfg.data.train:
        raise ConfigError("data.train: no training shard sets; e.g. --set data.train=out/shards/train")
    return cfg


def resolve_run(args: argparse.Namespace) -> ResolvedRun:
    """Decide the run from the command line and the launcher's environment. Exports torch's env://
    variables (dist.export_env) and talks to no other process; every rank decides alike."""
    from deepspeed.accelerator import get_accelerator

    cfg = resolve_config(args)
    env = dist.discover()
    expected_world = dist.expected_world_size(os.environ)  # read before export_env rewrites WORLD_SIZE
    dist.export_env(env)
    source = f"ds_config {cfg.ds_config}"
    ds = load_ds_config(cfg.ds_config, args.ds_set)
    plan = batch_plan(ds, env.world_size, source=source)

    cuda = torch.cuda.is_available()
    accel = get_accelerator()
    check_precision_runs(ds, source, "GPU" if cuda else "CPU", accel.is_fp16_supported(), accel.is_bf16_supported())
    mode = precision(ds)
    # FlashAttention-2's varlen kernel runs on a GPU in bf16, fp16 or a 16-bit autocast: "auto" means
    # varlen and padding-free layers there, sdpa and padded rows elsewhere.
    cfg = dataclasses.replace(cfg, model=resolve_auto(cfg.model, cuda and mode != "fp32"))
    return ResolvedRun(
        cfg=cfg, ds=ds, env=env, expected_world=expected_world, plan=plan, precision=mode, zero_stage=zero_stage(ds),
        device=torch.device("cuda", env.local_rank) if cuda else torch.device("cpu"),
        backend="nccl" if cuda else "gloo", tokenizer=load_tokenizer_info(cfg.tokenizer),
    )
