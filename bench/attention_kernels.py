"""The attention kernels alone: our Triton kernel against FlashAttention-2's varlen kernel, side by side.

    python bench/attention_kernels.py                  # GPU: roberta-base and -large shapes, table last
    python bench/attention_kernels.py --smoke          # CPU: tiny shapes in Triton's interpreter

Why: attention with the recipe's dropout 0.1 was a quarter of roberta-base's step on an H100 (FA2 at
~177 TFLOP/s forward, ~146 backward: bench/NOTES.md, stop 14), the lever left for roberta-large's goal.
This times exactly what a layer runs, on a packed micro-batch of FULL-SENTENCES-like rows (most 512
tokens long, some shorter: the padding-free layout): from the fused (N, 3, heads, 64) projection to
the (N, heads, 64) output and, in backward, to the gradient of that projection. For FA2 that includes
the copy that stacks dq, dk, dv into it, which our kernel avoids by writing in place. Ours runs with
each backward structure (`triton`: dK/dV and dQ kernels; `tri-fused`: one kernel, dQ by atomics:
`triton_attention.BACKWARDS`). All with the
recipe's dropout 0.1 and without it (what the dropout draw costs each kernel). Times are CUDA-event
medians after warm-up (our kernel autotunes at its first call); TFLOP/s count 4 x D x heads x
sum(L^2) forward and 2.5 times that backward, the convention of FlashAttention's own benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHAPES = {  # name: (heads, head_dim, rows per micro-batch)
    "base m128": (12, 64, 128),
    "large m64": (16, 64, 64),
}
SMOKE_SHAPES = {"tiny": (2, 16, 3)}


def row_lengths(rows: int, seq: int, seed: int = 0) -> list[int]:
    """FULL-SENTENCES-like: 7 of 8 rows full, the rest a document's tail of random length."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tails = torch.randint(seq // 8, seq, (rows,), generator=g).tolist()
    return [seq if i % 8 else tails[i] for i in range(rows)]


def kernels(device: str):
    """name -> fn(qkv (N, 3, h, d), offsets, max_len, p) -> (N, h, d), differentiable in qkv."""
    from roberta_ds import attention, triton_attention

    def flash2(qkv, offsets, max_len, p):
        q, k, v = qkv.unbind(1)  # the layer's views: row stride 3hd
        return attention.flash_varlen(q, k, v, offsets, max_len, p)

    def sdpa_segments(qkv, offsets, max_len, p):  # the CPU's stand-in: SDPA with the block mask
        n, _, h, d = qkv.shape
        inputs = attention.AttentionInputs("varlen", offsets, max_len)
        return attention.attend(qkv[None], inputs, p).view(n, h, d)

    def triton(kind):  # the backward's structure is read when the backward runs
        def fn(qkv, offsets, max_len, p):
            os.environ["ROBERTA_DS_TRITON_ATTN_BWD"] = kind
            return triton_attention.attention(qkv, offsets, max_len, p)
        return fn

    first = {"flash2": flash2} if device == "cuda" else {"sdpa-seg": sdpa_segments}
    return {**first, "triton": triton("split"), "tri-fused": triton("fused")}


def time_ms(fn, reps: int, device: str) -> float:
    import time

    import torch

    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(shape: str, heads: int, d: int, rows: int, seq: int, p: float, reps: int, device: str
            ) -> list[dict]:
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    lengths = row_lengths(rows, seq)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    n = int(offsets[-1])
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(n, 3, heads, d, generator=g).to(device, dtype).requires_grad_()
    upstream = torch.randn(n, heads, d, generator=g).to(device, dtype)
    fwd_flops = 4 * d * heads * sum(x * x for x in lengths)
    rows_out = []
    for name, fn in kernels(device).items():
        def forward(fn=fn):
            with torch.no_grad():
                fn(qkv, offsets, seq, p)

        def both(fn=fn):
            qkv.grad = None
            fn(qkv, offsets, seq, p).backward(upstream)  # (an env var set inside fn holds for backward too)

        for _ in range(3):  # warm-up: autotuning, caches
            both()
        f_ms, fb_ms = time_ms(forward, reps, device), time_ms(both, reps, device)
        b_ms = max(fb_ms - f_ms, 1e-9)
        rows_out.append({"shape": shape, "kernel": name, "dropout": p, "tokens": n, "fwd_ms": f_ms,
                         "bwd_ms": b_ms, "fwd_tflops": fwd_flops / f_ms / 1e9,
                         "bwd_tflops": 2.5 * fwd_flops / b_ms / 1e9, "fwd_bwd_ms": fb_ms})
    base = rows_out[0]["fwd_bwd_ms"]
    outs, grads = [], []  # without dropout the kernels must agree (bf16 rounding apart)
    for fn in kernels(device).values():
        qkv.grad = None
        out = fn(qkv, offsets, seq, 0.0)
        out.backward(upstream)
        outs.append(out.detach().float())
        grads.append(qkv.grad.float())
    for r, o, g in zip(rows_out, outs, grads, strict=True):
        r["speedup"] = base / r["fwd_bwd_ms"]
        r["max_diff"] = (o - outs[0]).abs().max().item()
        r["grad_diff"] = (g - grads[0]).abs().max().item() / max(grads[0].abs().max().item(), 1e-12)
    return rows_out


def print_table(rows: list[dict], device: str) -> None:
    print(f"\n== attention kernels ({device}; speedup = the first kernel's fwd+bwd time / this one's;"
          " max diff: its output's against the first's, grad diff: its qkv gradient's relative to the"
          " largest, both without dropout)")
    print(f"{'shape':<10} {'kernel':<9} {'drop':>4} {'tokens':>7} {'fwd ms':>7} {'bwd ms':>7} "
          f"{'fwd TF/s':>8} {'bwd TF/s':>8} {'speedup':>7} {'max diff':>8} {'grad diff':>9}")
    for r in rows:
        print(f"{r['shape']:<10} {r['kernel']:<9} {r['dropout']:>4.2f} {r['tokens']:>7} {r['fwd_ms']:>7.2f} "
              f"{r['bwd_ms']:>7.2f} {r['fwd_tflops']:>8.1f} {r['bwd_tflops']:>8.1f} {r['speedup']:>6.2f}x "
              f"{r['max_diff']:>8.1e} {r['grad_diff']:>9.1e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton's interpreter)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are built
    shapes, seq = (SMOKE_SHAPES, 24) if device == "cpu" else (SHAPES, 512)
    reps = 2 if device == "cpu" else args.reps
    rows = []
    for shape, (heads, d, nrows) in shapes.items():
        for p in (0.1, 0.0):
            rows += measure(shape, heads, d, nrows, seq, p, reps, device)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print_table(rows, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
