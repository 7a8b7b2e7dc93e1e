"""An `ours` case of bench/train_throughput.py: the real training path, built in-process and timed.

`start_trainer` builds the run exactly as `roberta-ds train` does (`train.setup()` from the repo's
ds_configs/zero{1,2,3}_bf16.json of the case's ZeRO stage, resized to the case, then `loop.Trainer`),
for one rank; `run_ours` times it: warm-up steps (compilation included), windows synchronised at
their edges only, one pass with `Trainer(timed=True)` for the phase shares, the CUDA
synchronisations of one step, recompiles, and optionally a torch.profiler table of one step.
bench/parity.py starts its trainer the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from cases import Case, model_fields, preset_of, steps_for

REPO = Path(__file__).resolve().parent.parent


def trainer_argv(
    c: Case, tok: Path, train: Path, out: Path, workers: int, extra: list[str] = ()
) -> list[str]:
    """`roberta-ds train` arguments for case `c` (the repo's shipped config of its ZeRO stage, resized)."""
    ds = [
        f"train_batch_size={c.micro * c.accum}",
        f"train_micro_batch_size_per_gpu={c.micro}",
        f"zero_optimization.stage={c.zero}",
        *c.ds_sets,
    ]
    if c.precision == "autocast":
        ds += ["bf16.enabled=false", "torch_autocast.enabled=true", "torch_autocast.dtype=bfloat16"]
    sets = [
        f"model.preset={c.model}",
        f"tokenizer={tok}",
        f"data.train={train}",
        f"data.max_seq_len={c.seq}",
        f"data.num_workers={workers}",
        f"output_dir={out}",
        "tensorboard=false",
        f"compile={str(c.compile).lower()}",
        f"model.activation_checkpointing={str(c.checkpointing).lower()}",
        *(f"model.{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in model_fields(c).items()),
        *c.sets,
        *extra,
    ]
    dtype = "fp16" if c.precision == "fp16" else "bf16"
    argv = ["--ds-config", str(REPO / "ds_configs" / f"zero{c.zero}_{dtype}.json"), "--resume", "none"]
    for s in ds:
        argv += ["--ds-set", s]
    for s in sets:
        argv += ["--set", s]
    return argv


def start_trainer(c: Case, tok: Path, train: Path, out: Path, workers: int, extra: list[str] = ()):
    """`train.setup()` + `loop.Trainer`, exactly what `roberta-ds train` builds, for one rank."""
    from hf_baseline import free_port_env

    from roberta_ds.engine.setup import parse_args, setup
    from roberta_ds.engine.trainer import Trainer
    from roberta_ds.launch.faults import Faults
    from roberta_ds.launch.signals import StopFlag

    free_port_env()
    stop = StopFlag()
    rt = setup(parse_args(trainer_argv(c, tok, train, out, workers, extra)), stop)
    return rt, Trainer(rt, stop, Faults(""), timed=False)


def grad_accum_path(optimizer: Any) -> str | None:
    """How DeepSpeed's bf16 ZeRO-0/1 optimizer accumulates fp32 gradients (None for other optimizers):
    kernels per parameter tensor and micro-batch (roberta_ds/engine/ds_grad_accum.py)."""
    if type(optimizer).__name__ != "BF16_Optimizer":
        return None
    from roberta_ds.engine.ds_grad_accum import is_fused

    fused = is_fused(optimizer)
    hooked = bool(getattr(optimizer, "immediate_grad_update", False))
    kernels = (1 if fused else 2) + (0 if hooked else 1)
    how = ("fused" if fused else "cast+add") + (", hooks" if hooked else "")
    return f"fp32 accumulation {kernels} kernel(s)/tensor ({how})"


def _float_or_none(x: Any) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def close_trainer(trainer: Any) -> None:
    from roberta_ds.launch.run_lock import release_held

    trainer.loader.close()  # shuts the DataLoader workers down now
    trainer.sink.close()
    release_held()  # the run directory's lock (train.setup took it), as the trainer's exit does


def count_syncs(step, device) -> int | None:
    """CUDA synchronisations torch reports during one call of `step` (None on CPU)."""
    import warnings

    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(device)  # after the mode is off: our own sync is not counted
    return sum("synchroniz" in str(w.message) for w in caught)


def profile_step(step, device, path: Path) -> None:
    """torch.profiler over one optimizer step; the top kernels by self device time go to `path`."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        from hf_baseline import sync

        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=key, row_limit=40)
    except Exception:  # noqa: BLE001 - older torch names it self_cuda_time_total
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)


def run_ours(c: Case, opts: argparse.Namespace, tok: Path, train: Path) -> dict[str, Any]:
    """The row of an `ours` case: tokens/s (median window), phase shares, syncs, recompiles, memory."""
    from hf_baseline import dynamo_graphs, measure_windows, peak_memory_gib, rate_summary, sync

    from roberta_ds.engine.metrics import mfu
    from roberta_ds.engine.trainer import StepTimes

    rt, trainer = start_trainer(c, tok, train, opts.work / "runs" / c.name, opts.workers)
    dev, plan, steps = rt.device, rt.plan, steps_for(c, opts)
    try:
        t0 = time.perf_counter()
        trainer.train_step()
        sync(dev)
        first_step_s = time.perf_counter() - t0  # compilation happens here
        for _ in range(opts.warmup - 1):
            trainer.train_step()
        sync(dev)
        graphs = dynamo_graphs()
        trainer.loss_sum.zero_()
        # measure_windows brackets each window with a sync; the trainer's Window counts its tokens.
        tokens, samples, seconds = [], [], []
        for _ in range(opts.windows):
            trainer.window.reset()
            seconds += measure_windows(trainer.train_step, dev, windows=1, steps=steps)
            tokens.append(trainer.window.tokens)
            samples.append(trainer.window.samples)
        loss = float(trainer.loss_sum) / (opts.windows * steps * plan.grad_accum)
        row = rate_summary(seconds, tokens, samples)

        trainer.timed, trainer.times = True, StepTimes()
        trainer.window.reset()
        for _ in range(steps):
            trainer.train_step()
        t = trainer.times
        timed_rate = trainer.window.take()["tokens_per_s"]
        trainer.timed = False
        syncs = count_syncs(trainer.train_step, dev)
        if opts.profile and preset_of(c) not in opts.profiled:
            profile_step(trainer.train_step, dev, opts.profile / f"profile_{c.name}.txt")
        recompiles = dynamo_graphs() - graphs  # over every step after warm-up, timed ones included
        row.update(
            {
                "impl": "ours",
                "compile": c.compile,
                "precision": "ds-" + c.precision,
                "zero": c.zero,
                "ds_sets": list(c.ds_sets),
                "sets": list(c.sets),
                "grad_accum": grad_accum_path(rt.engine.optimizer),
                "flops_per_token": trainer.flops_token,
                "mfu": mfu(row["tokens_per_s"], trainer.flops_token, 1, opts.peak_tflops),
                "peak_gib": peak_memory_gib(dev),
                "first_step_s": first_step_s,
                "recompiles": recompiles,
                "graphs": graphs,
                "loss": loss,
                "loss_finite": math.isfinite(loss),
                "fill": float(np.sum(tokens) / (np.sum(samples) * c.seq)),
                "outside_fb_share": 1 - t.forward_backward / t.total if t.total else None,
                "data_share": t.data / t.total if t.total else None,
                "optimizer_share": t.optimizer / t.total if t.total else None,
                "timed_tokens_per_s": timed_rate,
                "syncs_per_step": syncs,
                "micro_per_step": plan.grad_accum,
                "steps_per_window": steps,
                # fp16: the dynamic loss scale after the run and the steps it skipped on overflow
                "loss_scale": _float_or_none(getattr(rt.engine.optimizer, "loss_scale", None)),
                "skipped_steps": int(getattr(rt.engine, "skipped_steps", 0) or 0),
            }
        )
        return row
    finally:
        close_trainer(trainer)
