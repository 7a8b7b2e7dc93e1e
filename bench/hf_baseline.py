"""The Hugging Face baselines of bench/train_throughput.py, and the measurement protocol both share.

Baseline = what a user would run instead of roberta-ds on one GPU (adapted from the anchor script of
bench/NOTES.md's first entry):
`transformers.RobertaForMaskedLM` with sdpa attention and full-vocabulary logits, the same shape as
our model (hf_names.hf_config), trained with torch's AdamW (0.9, 0.98, eps 1e-6, wd 0.01, fused on
GPU) on random token rows (no padding, 15% of positions labelled) kept on the device:
  - `hf_ds`:       under a DeepSpeed engine built from the SAME ds_config dict as our case (the
                   repo's zero2_bf16.json with the case's micro batch and accumulation);
  - `hf_compiled`: no DeepSpeed: `torch.compile`d, bf16 autocast, the same accumulation and clipping.
Differences from the anchor: gradient accumulation as in our case (the anchor stepped AdamW every
micro-batch), the median of several synchronised windows instead of one, our ds_config file. Batches
come from device memory, so the baseline pays nothing for data loading (favours HF).

    python bench/hf_baseline.py --model roberta-base --seq 512 --micro 32 64 --accum 8
    python bench/hf_baseline.py --smoke           # CPU: tiny model, a few steps

Measurement protocol (`measure_windows`): `warmup` optimizer steps (compilation happens there), then
`windows` windows of `steps` optimizer steps; the device is synchronised at window edges only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch

from roberta_ds.config import ModelConfig, model_config
from roberta_ds.engine.metrics import flops_per_token, mfu

H100_PEAK_TFLOPS = 989.0
"""Dense bf16 datasheet peak of an H100 SXM: every MFU in these benchmarks is quoted against it."""


# ----------------------------------------------------------------------------------------------
# Measurement protocol (shared with train_throughput.py)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_windows(
    step: Callable[[], None], device: torch.device, *, windows: int, steps: int
) -> list[float]:
    """Seconds of each of `windows` windows of `steps` calls to `step`, synchronised at the edges only."""
    out = []
    for _ in range(windows):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def dynamo_graphs() -> int:
    """Graphs torch.compile has captured so far in this process (a rise after warm-up = a recompile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since the process started, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def rate_summary(seconds: list[float], tokens: list[float], samples: list[float]) -> dict[str, Any]:
    """Median / min / max tokens per second over the windows (each window's own counts), median seq/s."""
    rates = [t / s for t, s in zip(tokens, seconds)]
    return {
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_min": min(rates),
        "tokens_per_s_max": max(rates),
        "samples_per_s": statistics.median(n / s for n, s in zip(samples, seconds)),
        "window_s": [round(s, 4) for s in seconds],
    }


def free_port_env() -> None:
    """MASTER_PORT on a free local port and MASTER_ADDR localhost, unless already set."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def init_single_process(device: torch.device) -> None:
    """A one-rank process group (NCCL on GPU, gloo on CPU) on a free local port, once per process."""
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    free_port_env()
    for k, v in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False
    )


# ----------------------------------------------------------------------------------------------
# The Hugging Face model and its batches


def hf_model(cfg: ModelConfig) -> torch.nn.Module:
    """`RobertaForMaskedLM` with our model's shape and dropout, sdpa attention, fp32 weights."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    from roberta_ds.hf.names import hf_config

    conf = RobertaConfig(**{k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "dtype")})
    conf._attn_implementation = "sdpa"
    return RobertaForMaskedLM(conf)


def random_batches(
    cfg: ModelConfig, micro: int, seq: int, device: torch.device, count: int = 4, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` (input_ids (B, T), labels (B, T)) pairs: uniform ordinary ids, 15% labelled, no padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(5, cfg.vocab_size - 1, (micro, seq), generator=g)
        labels = torch.where(torch.rand(micro, seq, generator=g) < 0.15, ids, -100)
        out.append((ids.to(device), labels.to(device)))
    return out


def _adamw(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        model.parameters(),
        lr=1e-4,
        betas=(0.9, 0.98),
        eps=1e-6,
        weight_decay=0.01,
        fused=device.type == "cuda",
    )


def run_hf(
    cfg: ModelConfig,
    *,
    seq: int,
    micro: int,
    accum: int,
    mode: str,
    ds: dict[str, Any] | None,
    compile_model: bool,
    warmup: int,
    windows: int,
    steps: int,
    device: torch.device,
    peak_tflops: float | None,
) -> dict[str, Any]:
    """One baseline case; `mode` is "hf_ds" (DeepSpeed engine from `ds`) or "hf_compiled" (no DeepSpeed).

    Returns tokens/s (median window) and the rest of the row train_throughput.py prints.
    """
    if mode not in ("hf_ds", "hf_compiled"):
        raise ValueError(f"mode {mode!r}: expected hf_ds or hf_compiled")
    torch.manual_seed(0)
    model = hf_model(cfg).to(device)
    batches = random_batches(cfg, micro, seq, device)
    loss_sum = torch.zeros((), device=device)
    clip = float((ds or {}).get("gradient_clipping", 1.0))
    it = [0]

    if mode == "hf_ds":
        import deepspeed

        if ds is None:
            raise ValueError("hf_ds needs the ds_config dict")
        init_single_process(device)
        ds = {**ds, "train_micro_batch_size_per_gpu": micro, "train_batch_size": micro * accum}
        ds.pop("gradient_accumulation_steps", None)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=_adamw(model, device), config=ds, dist_init_required=False
        )

        def micro_step(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            loss = engine(input_ids=ids, labels=labels).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed applies the update (with clipping) at the accumulation boundary
            return loss

        def finish() -> None:
            pass
    else:
        opt = _adamw(model, device)
        fwd = torch.compile(model) if compile_model else model

        def micro_step(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = fwd(input_ids=ids, labels=labels).loss
            (loss / accum).backward()
            return loss

        def finish() -> None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

    def step() -> None:  # one optimizer step; no host sync inside
        for _ in range(accum):
            ids, labels = batches[it[0] % len(batches)]
            it[0] += 1
            loss_sum.add_(micro_step(ids, labels).detach().float())
        finish()

    t0 = time.perf_counter()
    step()
    sync(device)
    first_step_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    sync(device)
    graphs = dynamo_graphs()
    loss_sum.zero_()
    seconds = measure_windows(step, device, windows=windows, steps=steps)
    loss = float(loss_sum) / (windows * steps * accum)
    row = rate_summary(seconds, [steps * accum * micro * seq] * windows, [steps * accum * micro] * windows)
    flops = flops_per_token(cfg, seq, 1.0)  # HF computes logits at every position
    row.update(
        {
            "impl": mode,
            "compile": bool(compile_model and mode == "hf_compiled"),
            "precision": ("ds-" + ("bf16" if ds.get("bf16", {}).get("enabled") else "autocast"))
            if mode == "hf_ds"
            else "autocast",
            "zero": int(ds.get("zero_optimization", {}).get("stage", 0)) if mode == "hf_ds" else None,
            "flops_per_token": flops,
            "mfu": mfu(row["tokens_per_s"], flops, 1, peak_tflops),
            "peak_gib": peak_memory_gib(device),
            "first_step_s": first_step_s,
            "recompiles": dynamo_graphs() - graphs,
            "loss": loss,
            "fill": 1.0,
            "loss_finite": math.isfinite(loss),
        }
    )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="roberta-base", choices=["roberta-base", "roberta-large"])
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro", type=int, nargs="+", default=[32, 64])
    p.add_argument("--accum", type=int, default=8)
    p.add_argument("--mode", default="hf_ds", choices=["hf_ds", "hf_compiled"])
    p.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero2_bf16.json"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="CPU dry run: tiny model, seq 64, micro 2, few steps")
    a = p.parse_args()
    from roberta_ds.engine.ds_config import load_ds_config

    cuda = torch.cuda.is_available() and not a.smoke
    device = torch.device("cuda" if cuda else "cpu")
    cfg = model_config("tiny", vocab_size=2048) if a.smoke else model_config(a.model)
    for m in [2] if a.smoke else a.micro:
        row = run_hf(
            cfg,
            seq=64 if a.smoke else a.seq,
            micro=m,
            accum=2 if a.smoke else a.accum,
            mode=a.mode,
            ds=load_ds_config(a.ds_config),
            compile_model=cuda,
            warmup=1 if a.smoke else a.warmup,
            windows=2 if a.smoke else a.windows,
            steps=1 if a.smoke else a.steps,
            device=device,
            peak_tflops=H100_PEAK_TFLOPS if cuda else None,
        )
        print(json.dumps({"model": a.model, "micro": m, **row}), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
