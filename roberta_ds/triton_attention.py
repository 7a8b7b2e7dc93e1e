"""Variable-length attention with dropout in Triton, on the fused QKV projection (`attention_kernel:
triton`).

Why a kernel of our own: with the recipe's attention dropout 0.1, FlashAttention-2's varlen kernel
(the `varlen` kernel) ran at ~177 TFLOP/s forward and ~146 backward on an H100 (bench/NOTES.md, stop
14): a quarter of roberta-base's step and more of roberta-large's. FlashAttention-3 has no dropout.
At head size 64 the tensor cores are not what limits such a kernel: per score it does 256 (forward) or
640 (backward) matmul FLOPs, which take the tensor cores about as long as the exp2 and a few dozen
integer operations take the other units, so the dropout draw is a large share. Here the keep bit of
score (i, j) comes from a keyed integer hash whose row and column halves are computed once per row
and column of a block, leaving 6 integer operations per score (triton_attention_kernels.py), and the
matmuls are Triton's (Hopper's wgmma on an H100). The backward writes dQ, dK and dV straight into one
(N, 3, heads, D) gradient: with FlashAttention-2's API the three were stacked by an extra copy (3% of
a base step). Whether all this is faster is measured by `bench/attention_kernels.py` on the GPU.

Semantics are the `varlen` kernel's: segments laid end to end (offsets[0] = 0, offsets[-1] = N, each
at most `max_len` long; every position in exactly one segment), softmax(q k^T / sqrt(D)) within a
segment, dropout on the probabilities (kept with probability 1 - p, scaled by 1 / (1 - p)). The keep
bits differ from FlashAttention-2's (a hash, not Philox) and from its 8-bit threshold (p is rounded to
a multiple of 2^-32 here). A fresh key per call comes from torch's generator (`hash_dropout.draw_key`),
so masks change every call and replay from a restored RNG state; the backward regenerates them.
`keep_mask` and `reference_attention` are the same maths in plain torch: the tests compare the kernels
with them.

Runs on CUDA in bf16 / fp16, and anywhere under TRITON_INTERPRET=1 (Triton's CPU interpreter, which
the CPU tests use, in fp16: its bf16 `tl.dot` is wrong in triton 3.6). Wrapped as custom ops
(`roberta_ds::triton_attn`, `roberta_ds::triton_attn_backward`) so torch.compile keeps them whole.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from types import SimpleNamespace

import torch

from roberta_ds.errors import ConfigError
from roberta_ds.hash_dropout import draw_key

try:
    import triton
except ImportError:  # CPU-only installs: the kernel is then unavailable (`runs_on` says False)
    triton = None

DTYPES = (torch.bfloat16, torch.float16)
LOG2E = 1.4426950408889634
M32 = 0xFFFFFFFF

# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried once per process on the GPU (`triton.autotune`).
# dkdv keeps a BLOCK_N block of keys resident and loops over queries; dq the other way round.
# Chosen offline for sm_90 at head size 64 (bench/kernel_resources.py; bench/NOTES.md, stop 15):
# no register spills (a test keeps it so; 4-warp tiles of 128 x 64 and up spilled), and not the
# 8-warp tiles whose first matmul is 64 rows tall: their SASS does each score's work twice (two
# warpgroups on one 64-row wgmma tile), ~35-70 instructions per score and thread against ~16-32.
FWD_CONFIGS = ((128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3))
DKDV_CONFIGS = ((32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (128, 32, 8, 3))
DQ_CONFIGS = ((128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3))
FUSED_CONFIGS = ((32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3))
BACKWARDS = ("split", "fused")
"""The backward's structure, `ROBERTA_DS_TRITON_ATTN_BWD` (read per call; default split): "split" runs
dK/dV and dQ as two kernels, each recomputing the scores' exp2 and keep bits, deterministic; "fused"
one kernel with dQ by fp32 atomic adds (FlashAttention-2's way), each score's arithmetic once.
bench/attention_kernels.py times both."""
INTERPRET_BLOCK = 16  # the CPU interpreter: small blocks, no tuning
DELTA_BLOCK = 64


def check_available(model, cuda: bool) -> None:
    """Refuse `model.attention_kernel: triton` on a GPU without Triton (the CPU falls back to SDPA)."""
    if model.attention_kernel == "triton" and cuda and triton is None:
        raise ConfigError("model.attention_kernel=triton needs the triton package (CUDA builds of torch "
                          "ship it: pip install triton), or choose --set model.attention_kernel=varlen")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(t: torch.Tensor) -> bool:
    """Whether the kernels can take `t`: Triton installed, and bf16/fp16 on CUDA or fp16 under the
    interpreter (whose bf16 `tl.dot` is wrong: bf16 stays on the SDPA fallback there)."""
    if triton is None:
        return False
    return t.dtype in DTYPES if t.is_cuda else (interpreting() and t.dtype == torch.float16)


@functools.cache
def _kernels() -> SimpleNamespace:
    """The kernels, autotuned on a GPU; fixed small blocks under the interpreter (`meta`)."""
    from roberta_ds import triton_attention_kernels as k

    if interpreting():
        b = INTERPRET_BLOCK
        meta = {"BLOCK_M": b, "BLOCK_N": b}
        return SimpleNamespace(fwd=k.attn_fwd, dkdv=k.attn_bwd_dkdv, dq=k.attn_bwd_dq, fused=k.attn_bwd_dkdv,
                               delta=k.attn_bwd_delta, meta=meta, delta_block=b)

    # ROBERTA_DS_TRITON_ATTN_TUNE=0: each list's first configuration only (the GPU tests: every
    # configuration tried is one more compilation per kernel, dtype and dropout setting)
    first_only = os.environ.get("ROBERTA_DS_TRITON_ATTN_TUNE") == "0"

    def tuned(fn, configs, **kw):
        cfgs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w, s in configs[: 1 if first_only else None]]
        return triton.autotune(cfgs, key=["D", "DROPOUT"], **kw)(fn)

    return SimpleNamespace(fwd=tuned(k.attn_fwd, FWD_CONFIGS), dkdv=tuned(k.attn_bwd_dkdv, DKDV_CONFIGS),
                           dq=tuned(k.attn_bwd_dq, DQ_CONFIGS),
                           # tuning reruns the kernel: its atomic dQ must start from zero each time
                           fused=tuned(k.attn_bwd_dkdv, FUSED_CONFIGS, reset_to_zero=["DQ32"]),
                           delta=k.attn_bwd_delta, meta={}, delta_block=DELTA_BLOCK)


def backward_kind() -> str:
    kind = os.environ.get("ROBERTA_DS_TRITON_ATTN_BWD", "split")
    if kind not in BACKWARDS:
        raise ValueError(f"ROBERTA_DS_TRITON_ATTN_BWD={kind!r}: choose one of {', '.join(BACKWARDS)}")
    return kind


def dropout_args(p: float) -> tuple[int, float]:
    """p -> (the unsigned 32-bit threshold below which a score is dropped, the keep scale)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"attention dropout must be in [0, 1), got {p}")
    return min(round(p * 2**32), M32), 1.0 / (1.0 - p)


def _check(qkv: torch.Tensor, offsets: torch.Tensor) -> None:
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be (N, 3, heads, head_dim), got {tuple(qkv.shape)}")
    d = qkv.shape[3]
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 16 for the Triton kernel, got {d}")
    if offsets.dtype != torch.int32 or offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError("offsets must be an (S + 1,) int32 tensor of segment starts, ending at N")


def _forward(qkv: torch.Tensor, offsets: torch.Tensor, key: torch.Tensor, max_len: int, p: float):
    n, _, h, d = qkv.shape
    out = qkv.new_empty((n, h, d))
    lse = torch.empty((h, n), device=qkv.device, dtype=torch.float32)
    if n == 0:
        return out, lse
    kern = _kernels()
    thr, scale = dropout_args(p)
    segments = offsets.numel() - 1
    kern.fwd[lambda meta: (triton.cdiv(max_len, meta["BLOCK_M"]), segments, h)](
        qkv, out, lse, offsets, key, d**-0.5 * LOG2E, thr, scale, qkv.stride(0), out.stride(0), n, h * d,
        D=d, DROPOUT=p > 0, **kern.meta,
    )
    return out, lse


def _backward(dout, qkv, out, lse, offsets, key, max_len: int, p: float) -> torch.Tensor:
    n, _, h, d = qkv.shape
    dqkv = torch.empty_like(qkv)  # every slot written: the segments cover all N positions
    if n == 0:
        return dqkv
    kern = _kernels()
    thr, scale = dropout_args(p)
    segments = offsets.numel() - 1
    # per row and head (attn_bwd_delta): delta (1 - p); with dropout also LSE + log2(1 - p) and the keep
    # bits' row hashes
    delta = torch.empty((h, n), device=qkv.device, dtype=torch.float32)
    lseb = torch.empty_like(lse) if p > 0 else lse
    rowh = torch.empty((h, n) if p > 0 else (0,), device=qkv.device, dtype=torch.int32)
    kern.delta[(triton.cdiv(n, kern.delta_block), h)](
        out, dout, lse, delta, lseb, rowh, key, scale, out.stride(0), dout.stride(0), n, D=d,
        BLOCK=kern.delta_block, DROPOUT=p > 0,
    )
    consts = (key, d**-0.5 * LOG2E, d**-0.5, thr, qkv.stride(0), dout.stride(0), n, h * d)
    if backward_kind() == "fused":
        dq32 = torch.zeros((n, h, d), device=qkv.device, dtype=torch.float32)
        kern.fused[lambda meta: (triton.cdiv(max_len, meta["BLOCK_N"]), segments, h)](
            qkv, dout, lseb, delta, rowh, dqkv, dq32, offsets, *consts, D=d, DROPOUT=p > 0, FUSED=True,
            **kern.meta,
        )
        dqkv[:, 0].copy_(dq32)
        return dqkv
    kern.dkdv[lambda meta: (triton.cdiv(max_len, meta["BLOCK_N"]), segments, h)](
        qkv, dout, lseb, delta, rowh, dqkv, dqkv, offsets, *consts, D=d, DROPOUT=p > 0, FUSED=False,
        **kern.meta,
    )  # (DQ32 unused: dqkv in its place)
    kern.dq[lambda meta: (triton.cdiv(max_len, meta["BLOCK_M"]), segments, h)](
        qkv, dout, lseb, delta, rowh, dqkv, offsets, *consts, D=d, DROPOUT=p > 0, **kern.meta
    )
    return dqkv


@torch.library.custom_op("roberta_ds::triton_attn", mutates_args=())
def _attn_op(
    qkv: torch.Tensor, offsets: torch.Tensor, key: torch.Tensor, max_len: int, dropout_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(qkv, offsets, key, max_len, dropout_p)


@_attn_op.register_fake
def _(qkv, offsets, key, max_len, dropout_p):
    n, _, h, d = qkv.shape
    return qkv.new_empty((n, h, d)), qkv.new_empty((h, n), dtype=torch.float32)


@torch.library.custom_op("roberta_ds::triton_attn_backward", mutates_args=())
def _attn_backward_op(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, offsets: torch.Tensor,
    key: torch.Tensor, max_len: int, dropout_p: float,
) -> torch.Tensor:
    return _backward(dout, qkv, out, lse, offsets, key, max_len, dropout_p)


@_attn_backward_op.register_fake
def _(dout, qkv, out, lse, offsets, key, max_len, dropout_p):
    return torch.empty_like(qkv)


def _setup_context(ctx, inputs, output) -> None:
    qkv, offsets, key, max_len, dropout_p = inputs
    out, lse = output
    ctx.save_for_backward(qkv, offsets, key, out, lse)
    ctx.max_len, ctx.dropout_p = max_len, dropout_p


def _attn_grad(ctx, dout, _dlse):
    qkv, offsets, key, out, lse = ctx.saved_tensors
    dqkv = _attn_backward_op(dout.contiguous(), qkv, out, lse, offsets, key, ctx.max_len, ctx.dropout_p)
    return dqkv, None, None, None, None


_attn_op.register_autograd(_attn_grad, setup_context=_setup_context)


def attention(
    qkv: torch.Tensor, offsets: torch.Tensor, max_len: int, dropout_p: float, key: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention within segments. qkv (N, 3, heads, head_dim) bf16/fp16 (the fused projection's view);
    offsets (S + 1,) int32 from 0 to N; max_len bounds every segment's length; key: () int32 dropout key,
    default a fresh draw -> (N, heads, head_dim). Differentiable with respect to qkv."""
    _check(qkv, offsets)
    if key is None:
        key = draw_key(qkv.device) if dropout_p > 0 else torch.zeros((), device=qkv.device, dtype=torch.int32)
    return _attn_op(qkv.contiguous(), offsets, key, max_len, dropout_p)[0]


# --- the same maths in plain torch: the tests' reference ------------------------------------------


def mix32(h: torch.Tensor) -> torch.Tensor:
    """The kernels' `mix32` on int64 tensors holding unsigned 32-bit values."""
    h = h ^ (h >> 16)
    h = (h * 0x21F0AAAD) & M32
    h = h ^ (h >> 15)
    h = (h * 0x735A2D97) & M32
    return h ^ (h >> 15)


def keep_mask(key: int, head: int, rows: torch.Tensor, cols: torch.Tensor, p: float) -> torch.Tensor:
    """The kernels' keep bits of one head: rows (M,) packed query positions, cols (K,) key positions
    within the segment, int64 -> (M, K) bool, True = kept."""
    hk = mix32(torch.tensor((key & M32) + head * 0x7F4A7C15) & M32)
    k_row, k_col = mix32(hk ^ 0x1B873593), mix32(hk ^ 0x5BD1E995)
    r, c = mix32(rows ^ k_row), (cols * 0x2545F491 + k_col) & M32  # the kernels' `col_hash`
    h = ((r[:, None] ^ c[None, :]) * 0x21F0AAAD) & M32  # the kernels' `score_bits`
    return (((h ^ (h >> 15)) * 0x735A2D97) & M32) >= dropout_args(p)[0]


def reference_attention(
    qkv: torch.Tensor, offsets: torch.Tensor, dropout_p: float = 0.0, key: int = 0
) -> torch.Tensor:
    """`attention` in fp32 torch, differentiable, segment by segment (slow: for tests)."""
    x = qkv.float()
    _, _, h, d = x.shape
    bounds = offsets.tolist()
    outs = []
    for start, end in itertools.pairwise(bounds):
        if end == start:
            continue
        q, k, v = x[start:end].unbind(1)  # each (L, heads, D)
        probs = torch.softmax(torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(d), dim=-1)
        if dropout_p > 0:
            rows = torch.arange(start, end, dtype=torch.int64)
            cols = torch.arange(end - start, dtype=torch.int64)
            keep = torch.stack([keep_mask(key, head, rows, cols, dropout_p) for head in range(h)])
            probs = torch.where(keep.to(probs.device), probs / (1 - dropout_p), 0.0)
        outs.append(torch.einsum("hij,jhd->ihd", probs, v))
    return torch.cat(outs) if outs else x.new_empty((0, h, d))
