"""Training metrics: model FLOPs and MFU, throughput windows, and the JSONL / TensorBoard / console sinks.

MFU (model FLOPs utilisation) counts the FLOPs the model needs, not what the hardware ran
(recomputation from activation checkpointing is not credited), per token of training:

    flops/token = 3 x forward = 6 P_layers + 12 L s h + 6 (h^2 + h V) f

P_layers: the encoder layers' matmul parameters (L (4 h^2 + 2 h ffn)); 12 L s h: attention
scores and weighted sum (Q K^T and A V, 2 s h multiply-adds each per token per layer, x3 for
training); the LM head's dense h^2 and decoder h V run on a fraction f of positions (the masked
ones with our masked-only head, f = 1 for a full head). MFU = tokens/s x flops/token / (devices x
peak), with peak the datasheet's dense bf16 figure (989 TFLOP/s for an H100 SXM).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from roberta_ds.config import ModelConfig

# Dense bf16 datasheet peaks (TFLOP/s), matched against torch.cuda.get_device_name() substrings.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A10G": 125.0,
    "L40S": 362.0,
    "V100": 125.0,
}


def flops_per_token(cfg: ModelConfig, seq_len: int, head_fraction: float) -> float:
    """Training FLOPs per token (see the module docstring)."""
    h, L = cfg.hidden_size, cfg.num_layers
    p_layers = L * (4 * h * h + 2 * h * cfg.ffn_size)
    return 6 * p_layers + 12 * L * seq_len * h + 6 * (h * h + h * cfg.vocab_size) * head_fraction


def peak_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None


def mfu(tokens_per_s: float, flops_token: float, devices: int, peak: float | None) -> float | None:
    if not peak:
        return None
    return tokens_per_s * flops_token / (devices * peak * 1e12)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d{h:02d}h{m:02d}m" if d else f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Window:
    """Tokens and samples over wall time since the last `take()`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.samples = 0
        self.steps = 0

    def add(self, tokens: int, samples: int) -> None:
        self.tokens += tokens
        self.samples += samples
        self.steps += 1

    def take(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"seconds": dt, "tokens_per_s": self.tokens / dt, "samples_per_s": self.samples / dt,
               "step_time_s": dt / max(self.steps, 1)}
        self.reset()
        return out


class MetricsSink:
    """Rank 0's outputs: `metrics.jsonl` (always), TensorBoard (when installed), console lines."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, console: TextIO = sys.stdout) -> None:
        self.enabled = enabled
        self.console = console
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(out_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None:
                    self._tb.add_scalar(k, v, step)

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, file=self.console, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def console_line(r: dict[str, Any], last_step: int, eta_s: float) -> str:
    """One progress line: step/total, loss, validation loss and accuracy, each against its context-free
    baseline (unigram.py) when known, lr, grad norm, throughput, MFU, memory, ETA."""
    parts = [f"step {r['step']}/{last_step} ({100.0 * r['step'] / last_step:.1f}%)",
             f"loss {r['loss']:.4f}" + _against_entropy(r['loss'], r.get("unigram_entropy"))]
    if r.get("valid_loss") is not None:
        parts.append(f"valid {r['valid_loss']:.4f} (ppl {r['valid_ppl']:.2f})"
                     + _against_entropy(r["valid_loss"], r.get("valid_unigram_entropy")))
    if r.get("valid_acc") is not None:
        parts.append(f"acc {100 * r['valid_acc']:.2f}%" + _against_top1(r["valid_acc"], r.get("valid_unigram_top1")))
    parts.append(f"lr {r['lr']:.3g}")
    if r.get("grad_norm") is not None:
        parts.append(f"gnorm {r['grad_norm']:.3f}")
    if r.get("loss_scale") is not None:
        parts.append(f"scale {r['loss_scale']:g}")
    parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if r.get("peak_mem_gib") is not None:
        parts.append(f"mem {r['peak_mem_gib']:.1f}GiB")
    if r.get("skipped_steps"):
        parts.append(f"skipped {r['skipped_steps']}")
    parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


def _against_entropy(loss: float, entropy: float | None) -> str:
    """" vs unigram 6.71 (-1.23)": the loss against the context-free bound (negative: below it)."""
    if entropy is None or not math.isfinite(loss):
        return ""
    return f" vs unigram {entropy:.2f} ({loss - entropy:+.2f})"


def _against_top1(acc: float, top1: float | None) -> str:
    """" vs top-1 7.3% (3.1x)": the accuracy against always answering the most frequent token."""
    if top1 is None:
        return ""
    return f" vs top-1 {100 * top1:.1f}%" + (f" ({acc / top1:.2f}x)" if top1 > 0 else "")
