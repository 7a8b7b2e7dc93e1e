"""The model's GPU check: the attention kernels that train, varlen vs key mask, masked-only head, speed.

    python bench/model_check.py                 # GPU: roberta-base, micro 32 x 512, bf16 autocast
    python bench/model_check.py --smoke         # CPU: tiny model, a few iterations (the CI check)

Three measurements, one table printed last:
  1. attention kernel: one training-mode forward+backward (dropout 0.1, bf16 autocast) under
     torch.profiler, for a batch with padding (our key-padding mask) and one without
     (`has_padding=False`, no mask); the SDPA implementations that ran are read from the profiler's
     op names (`aten::_scaled_dot_product_{flash,efficient,cudnn}_attention`, or the math fallback).
     Passes on a GPU when both run a fused flash-attention kernel: FlashAttention-2 (`flash`) or
     cuDNN's (`cudnn`, kernels `cudnn_generated_fort_native_sdpa_sm90_flash_{fprop,bprop}`), which
     PyTorch 2.11 picks on an H100 for both batches, mask or none; never the math fallback;
     The "varlen" kernel (`model.attention_kernel`) must show FlashAttention-2's varlen op
     (`aten::_flash_attention_forward`, "flash-varlen") on a GPU;
  2. head parity: eval mode (no dropout), bf16 autocast, the same batch: the masked-only head's loss
     (gather, then project) against cross-entropy over the full logits at the labelled positions,
     and both against fp32; passes within bf16 tolerance (1% relative);
  3. varlen parity: eval mode (no dropout), bf16 autocast, the padded batch: loss and every parameter
     gradient of the "varlen" kernel, and of the padding-free layers (`model.unpad`), against the key
     mask's; passes at a loss gap < 1% and gradient cosine > 0.999 (on CPU, exact and near-exact);
  4. forward+backward time at micro 32 x 512, training mode, bf16 autocast, fp32 weights, eager:
     ours with padding mask, with varlen segments, with padding-free layers, without a mask, with the
     mask forced onto the cuDNN backend (on CUDA), and HF `RobertaForMaskedLM` (sdpa, full-vocabulary
     logits, no mask) on the same ids.
     Median of timed iterations, device synchronised per iteration.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for p in (str(REPO), str(REPO / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch
import torch.nn.functional as F

from roberta_ds.config import ModelConfig, model_config
from roberta_ds.data.masking import unpad_index
from roberta_ds.model.model import RobertaMLM

SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash(cpu)",
    "aten::_scaled_dot_product_efficient_attention": "mem-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_flash_attention_forward": "flash-varlen",
}
BF16_RTOL = 1e-2


def make_batch(
    cfg: ModelConfig, micro: int, seq: int, device: torch.device, *, pad_rows: bool, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ids (specials excluded), 15% of positions labelled: (ids, positions, labels, dense labels).
    With pad_rows, every second row ends in pad tokens (a quarter of its length), as packed blocks do."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, cfg.vocab_size - 1, (micro, seq), generator=g)
    if pad_rows:
        ids[::2, seq - seq // 4 :] = cfg.pad_id
    k = max(1, int(0.15 * seq))
    positions = torch.stack([torch.randperm(seq - seq // 4, generator=g)[:k] for _ in range(micro)])
    labels = torch.gather(ids, 1, positions)
    dense = torch.full_like(ids, -100).scatter_(1, positions, labels)
    return tuple(t.to(device) for t in (ids, positions, labels, dense))  # type: ignore[return-value]


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16)


def sdpa_ops_used(fn: Any) -> list[str]:
    """The SDPA implementations one call of fn ran, by the profiler's aten op names."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    return sorted({label for op, label in SDPA_OPS.items() if op in names}) or ["none seen"]


def with_kernel(model: RobertaMLM, kernel: str) -> RobertaMLM:
    """A copy of `model` (same weights, device, mode) whose attention runs `kernel`: sdpa | varlen |
    unpad (varlen with padding-free layers)."""
    fields = {"attention_kernel": "sdpa" if kernel == "sdpa" else "varlen", "unpad": kernel == "unpad"}
    other = RobertaMLM(dataclasses.replace(model.cfg, **fields))
    other.load_state_dict(model.state_dict())
    return other.to(next(model.parameters()).device).train(model.training)


def check_kernels(model: RobertaMLM, batches: dict[str, tuple], device: torch.device) -> dict[str, Any]:
    model.train()
    out = {}
    cases = (
        ("padded batch, key mask", model, True),
        ("padded batch, varlen", with_kernel(model, "varlen"), True),
        ("padded batch, padding-free", with_kernel(model, "unpad"), True),
        ("no padding, no mask", model, False),
    )
    for name, m, has_padding in cases:
        ids, pos, lab, _ = batches["padded" if has_padding else "full"]
        index = unpad_index_of(ids, model.cfg.pad_id)

        def fwd_bwd(m=m, ids=ids, pos=pos, lab=lab, has_padding=has_padding, index=index) -> None:
            with autocast(device):
                loss = m(ids, pos, lab, has_padding=has_padding, unpad_index=index)
            loss.backward()
            m.zero_grad(set_to_none=True)

        fwd_bwd()  # warm-up outside the profile
        out[name] = sdpa_ops_used(fwd_bwd)
    return out


def unpad_index_of(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """What the loader sends with a batch for `model.unpad`: its own `unpad_index`, on the host."""
    return torch.from_numpy(unpad_index(ids.cpu().numpy() == pad_id)).to(ids.device)


def check_varlen(model: RobertaMLM, batch: tuple, device: torch.device) -> dict[str, Any]:
    """Loss and gradients of the varlen kernel and of the padding-free layers against the key mask's,
    on a padded batch (eval: no dropout). rel_gap / grad_cosine: the worse of the two."""
    ids, pos, lab, _ = batch
    index = unpad_index_of(ids, model.cfg.pad_id)
    res: dict[str, Any] = {}
    for kernel in ("sdpa", "varlen", "unpad"):
        m = with_kernel(model, kernel).eval()
        with autocast(device):
            loss = m(ids, pos, lab, unpad_index=index)
        loss.backward()
        res[kernel] = (loss.float().item(), torch.cat([q.grad.float().flatten() for q in m.parameters()]))
    ref = res["sdpa"]
    gaps = {k: abs(res[k][0] - ref[0]) / abs(ref[0]) for k in ("varlen", "unpad")}
    cos = {k: F.cosine_similarity(res[k][1], ref[1], dim=0).item() for k in ("varlen", "unpad")}
    return {"loss_sdpa": ref[0], "loss_varlen": res["varlen"][0], "loss_unpad": res["unpad"][0],
            "gaps": gaps, "cosines": cos, "rel_gap": max(gaps.values()), "grad_cosine": min(cos.values()),
            "ok": max(gaps.values()) < BF16_RTOL and min(cos.values()) > 0.999}


def check_head(model: RobertaMLM, batch: tuple, device: torch.device) -> dict[str, Any]:
    """Masked-only head loss vs the full head's at the same positions: bf16 autocast and fp32."""
    ids, pos, lab, dense = batch
    model.eval()
    res: dict[str, Any] = {}
    with torch.no_grad():
        for prec, ctx in (("bf16", autocast(device)), ("fp32", contextlib.nullcontext())):
            with ctx:
                masked = model(ids, pos, lab).float().item()
                logits = model.logits(ids).float()
            full = F.cross_entropy(logits.flatten(0, 1), dense.flatten(), ignore_index=-100).item()
            res[prec] = {"masked_only": masked, "full_head": full}
    ref = res["fp32"]["full_head"]
    gaps = {
        "bf16 masked vs bf16 full": abs(res["bf16"]["masked_only"] - res["bf16"]["full_head"]) / ref,
        "bf16 masked vs fp32 full": abs(res["bf16"]["masked_only"] - ref) / ref,
        "fp32 masked vs fp32 full": abs(res["fp32"]["masked_only"] - ref) / ref,
    }
    res["rel_gaps"] = gaps
    res["ok"] = max(gaps.values()) < BF16_RTOL and gaps["fp32 masked vs fp32 full"] < 1e-4
    model.train()
    return res


def time_fn(fn: Any, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of fn, the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_fwd_bwd(
    cfg: ModelConfig, batches: dict[str, tuple], device: torch.device, warmup: int, iters: int
) -> list[dict[str, Any]]:
    from hf_baseline import hf_model

    torch.manual_seed(0)
    ours = RobertaMLM(cfg).to(device).train()
    rows = []

    def ours_step(has_padding: bool, backend: Any = None, model: RobertaMLM | None = None) -> Any:
        ids, pos, lab, _ = batches["padded" if has_padding else "full"]
        m = model or ours
        index = unpad_index_of(ids, cfg.pad_id)

        def step() -> None:
            ctx = contextlib.nullcontext()
            if backend is not None:
                from torch.nn.attention import sdpa_kernel

                ctx = sdpa_kernel([backend])
            with ctx, autocast(device):
                loss = m(ids, pos, lab, has_padding=has_padding, unpad_index=index)
            loss.backward()
            m.zero_grad(set_to_none=True)

        return step

    variants: list[tuple[str, Any]] = [
        ("ours, key mask (packed rows)", ours_step(True)),
        ("ours, varlen segments (packed rows)", ours_step(True, model=with_kernel(ours, "varlen"))),
        ("ours, padding-free layers (packed rows)", ours_step(True, model=with_kernel(ours, "unpad"))),
        ("ours, no mask", ours_step(False)),
    ]
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        if hasattr(SDPBackend, "CUDNN_ATTENTION"):
            variants.append(("ours, key mask, cuDNN backend", ours_step(True, SDPBackend.CUDNN_ATTENTION)))
    for name, fn in variants:
        rows.append(_timed_row(name, fn, batches["full"][0], device, warmup, iters))
    hf = hf_model(cfg).to(device).train()
    ids, _, _, dense = batches["full"]

    def hf_step() -> None:
        with autocast(device):
            loss = hf(input_ids=ids, labels=dense).loss
        loss.backward()
        hf.zero_grad(set_to_none=True)

    rows.append(_timed_row("HF RobertaForMaskedLM, sdpa, no mask", hf_step, ids, device, warmup, iters))
    base = rows[-1].get("ms")
    for r in rows:
        r["speedup_vs_hf"] = (base / r["ms"]) if base and r.get("ms") else None
    return rows


def _timed_row(name: str, fn: Any, ids: torch.Tensor, device: torch.device, warmup: int, iters: int) -> dict:
    try:
        s = time_fn(fn, device, warmup, iters)
    except Exception as e:  # noqa: BLE001 - a backend refusing the shape is a finding, not a crash
        return {"variant": name, "error": f"{type(e).__name__}: {str(e)[:160]}"}
    return {"variant": name, "ms": s * 1e3, "positions_per_s": ids.numel() / s}


def format_report(
    kernels: dict, head: dict, varlen: dict, timing: list[dict], device: str, shape: str
) -> str:
    lines = [f"== roberta-ds model check, one {device}; {shape}; bf16 autocast, fp32 weights, eager"]
    lines.append("SDPA implementation in a training-mode forward+backward (dropout 0.1):")
    lines += [f"  {k:<26} {', '.join(v)}" for k, v in kernels.items()]
    lines.append("masked-only head vs full head (eval, same batch), loss:")
    for prec in ("bf16", "fp32"):
        h = head[prec]
        lines.append(f"  {prec}: masked-only {h['masked_only']:.5f}  full {h['full_head']:.5f}")
    gaps = ", ".join(f"{k} {v:.2e}" for k, v in head["rel_gaps"].items())
    lines.append(f"  relative gaps: {gaps} -> {'PASS' if head['ok'] else 'FAILED'} (bf16 tol {BF16_RTOL:g})")
    lines.append(f"vs the key mask (eval, padded batch, bf16; key mask loss {varlen['loss_sdpa']:.5f}):")
    for k, label in (("varlen", "varlen segments"), ("unpad", "padding-free layers")):
        lines.append(f"  {label:<20} loss {varlen['loss_' + k]:.5f}, gap {varlen['gaps'][k]:.2e}, "
                     f"gradient cosine {varlen['cosines'][k]:.6f}")
    lines.append(f"  -> {'PASS' if varlen['ok'] else 'FAILED'} (gap < {BF16_RTOL:g}, cosine > 0.999)")
    lines.append("forward+backward, median:")
    lines.append(f"  {'variant':<40} {'ms':>8} {'positions/s':>12} {'vs HF':>7}")
    for r in timing:
        if "error" in r:
            lines.append(f"  {r['variant']:<40} {'error: ' + r['error']}")
        else:
            x = f"{r['speedup_vs_hf']:.2f}x" if r.get("speedup_vs_hf") else "-"
            lines.append(f"  {r['variant']:<40} {r['ms']:8.1f} {r['positions_per_s']:12,.0f} {x:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU model (default without CUDA)")
    p.add_argument("--micro", type=int, default=None, help="GPU 32, smoke 2")
    p.add_argument("--seq", type=int, default=None, help="GPU 512, smoke 64")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (GPU 10, smoke 2)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not a.smoke
    device = torch.device("cuda" if gpu else "cpu")
    # The key mask over padded rows is the reference every other kernel is checked against.
    cfg = model_config("roberta-base" if gpu else "tiny", vocab_size=50265 if gpu else 2048,
                       attention_kernel="sdpa", unpad=False)
    micro, seq = a.micro or (32 if gpu else 2), a.seq or (512 if gpu else 64)
    iters = a.iters or (10 if gpu else 2)
    batches = {
        "full": make_batch(cfg, micro, seq, device, pad_rows=False),
        "padded": make_batch(cfg, micro, seq, device, pad_rows=True),
    }
    torch.manual_seed(0)
    model = RobertaMLM(cfg).to(device)
    kernels = check_kernels(model, batches, device)
    head = check_head(model, batches["padded"], device)
    varlen = check_varlen(model, batches["padded"], device)
    del model
    timing = time_fwd_bwd(cfg, batches, device, warmup=3 if gpu else 1, iters=iters)
    name = torch.cuda.get_device_name() if gpu else "CPU (tiny model: numbers do not count)"
    shape = f"micro {micro} x {seq}, {cfg.num_layers} layers"
    report = format_report(kernels, head, varlen, timing, name, shape)
    if a.json:
        a.json.write_text(json.dumps({"kernels": kernels, "head": head, "varlen": varlen, "timing": timing},
                                     indent=1))
    print(report, flush=True)
    fused = {"flash", "cudnn"}
    varlen_rows = ("padded batch, varlen", "padded batch, padding-free")
    sdpa = [ops for k, ops in kernels.items() if k not in varlen_rows]
    sdpa_ok = all(fused & set(ops) and "math" not in ops for ops in sdpa)
    fused_ok = not gpu or (sdpa_ok and all("flash-varlen" in kernels[k] for k in varlen_rows))
    print(f"fused flash-attention kernel in training: {'PASS' if fused_ok else 'FAILED'}", flush=True)
    return 0 if head["ok"] and varlen["ok"] and fused_ok else 1


if __name__ == "__main__":
    sys.exit(main())
