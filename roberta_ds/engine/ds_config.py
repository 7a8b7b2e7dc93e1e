"""DeepSpeed JSON configs: loading, `--ds-set` overrides, and the batch arithmetic checked up front.

The DeepSpeed JSON owns batch sizes, precision, ZeRO stage and clipping. We read the same numbers
DeepSpeed will derive (micro batch x accumulation x world = global batch) so a global batch the
world size cannot divide is refused before any process group work, with the arithmetic spelled out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from roberta_ds.config_load import apply_overrides
from roberta_ds.data.sampling import BatchPlan
from roberta_ds.errors import ConfigError

OWNED_BY_US = ("optimizer", "scheduler")


def load_ds_config(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        builtin = Path(__file__).resolve().parents[2] / "ds_configs" / p.name  # the repo root
        hint = f" (did you mean {builtin}?)" if builtin.is_file() and builtin != p else ""
        raise ConfigError(f"ds_config {path}: file not found{hint}")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    for key in OWNED_BY_US:
        if key in raw:
            raise ConfigError(
                f"ds_config {path}: has an {key!r} section, but the optimizer and LR schedule belong to the "
                "training config (optim.*); remove it from the DeepSpeed JSON"
            )
    return apply_overrides(raw, list(overrides))


def batch_plan(ds: dict[str, Any], world_size: int, source: str = "ds_config") -> BatchPlan:
    """The (global, micro, accumulation) DeepSpeed will use for `world_size` ranks, or a clear error."""
    tbs = ds.get("train_batch_size")
    mbs = ds.get("train_micro_batch_size_per_gpu")
    gas = ds.get("gradient_accumulation_steps")
    if tbs is not None and mbs is not None:
        if tbs % (mbs * world_size):
            raise ConfigError(
                f"{source}: train_batch_size {tbs} is not divisible by train_micro_batch_size_per_gpu {mbs} x "
                f"world size {world_size} = {mbs * world_size} ({tbs} / {mbs * world_size} = "
                f"{tbs / (mbs * world_size):.3f} accumulation steps). Pick a micro batch or GPU count whose "
                f"product divides {tbs}"
            )
        plan = BatchPlan(tbs, mbs, tbs // (mbs * world_size), world_size)
        if gas is not None and gas != plan.grad_accum:
            raise ConfigError(
                f"{source}: gradient_accumulation_steps {gas} contradicts train_batch_size {tbs} = "
                f"{mbs} x {plan.grad_accum} x {world_size}; remove gradient_accumulation_steps"
            )
        return plan
    if mbs is not None and gas is not None:
        return BatchPlan.of(mbs, gas, world_size)
    if tbs is not None and gas is not None:
        if tbs % (gas * world_size):
            raise ConfigError(
                f"{source}: train_batch_size {tbs} is not divisible by gradient_accumulation_steps {gas} x "
                f"world size {world_size}"
            )
        return BatchPlan(tbs, tbs // (gas * world_size), gas, world_size)
    raise ConfigError(f"{source}: set train_batch_size and train_micro_batch_size_per_gpu")


def precision(ds: dict[str, Any]) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    if ds.get("torch_autocast", {}).get("enabled"):
        return f"autocast-{ds['torch_autocast'].get('dtype', 'bfloat16')}"
    return "fp32"


def check_precision_runs(ds: dict[str, Any], source: str, device: str, fp16_ok: bool, bf16_ok: bool) -> None:
    """Refuse a 16-bit mode the device cannot run, naming the config and the shipped one that runs.

    DeepSpeed refuses it too, but only with "Type fp16 is not supported on your device." and a
    traceback. On a CPU, fp16 depends on the processor (AVX512-FP16/AMX; DeepSpeed asks oneDNN)."""
    ok = {"fp16": fp16_ok, "bf16": bf16_ok}
    mode = precision(ds)
    if not ok.get(mode, True):
        other = "bf16" if mode == "fp16" else "fp16"  # a V100 runs fp16, not bf16
        fix = f"ds_configs/zero2_{other}.json" if ok[other] else "a config without fp16 and bf16 (fp32)"
        raise ConfigError(f"{source}: {mode} is enabled, but DeepSpeed cannot run {mode} on this {device}; "
                          f"use {fix}")


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
