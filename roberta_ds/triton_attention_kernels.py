"""Triton kernels of `roberta_ds.triton_attention` (imported only where Triton is installed).

Layout: `QKV` is the fused projection (N, 3, heads, D) with a unit stride over D and `stride_t`
elements from one token to the next; q, k and v of head h start at h * D, HD + h * D and
2 * HD + h * D (HD = heads x D). `CU` holds S + 1 int32 segment offsets; every program handles one
(block, segment, head): grid (cdiv(max_len, BLOCK), S, heads), and a block past its segment's end
returns at once. `LSE` and `DELTA` are (heads, N) fp32. Softmax runs in base 2: `qk_scale` is the
attention scale times log2(e), and LSE holds log2 of each row's normaliser. The backward kernels read
the rows as `attn_bwd_delta` prepares them: with dropout, LSE - log2(1 / (1 - p)) and delta (1 - p).

Dropout: element (i, j) of head h (i the query's packed position, j the key's position within its
segment) is kept when `score_bits(mix32(i ^ k_row), col_hash(j, k_col)) >= drop_thr` as unsigned
32-bit numbers, with k_row, k_col from `head_keys`. The row hash costs once per row of a block, the
column hash one multiply-add per column a thread holds; per score it is `score_bits` (an xor, two
multiplies, one shift-xor), a compare and a select: ~7 instructions, where a Philox4x32-10 draw is
about 70 per four 32-bit outputs. One multiply alone after the xor left a measurable 2 x 2 rectangle
dependence (bench/NOTES.md, stop 15).
`triton_attention.keep_mask` is the same function in torch for the tests.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mix32(h):
    """Wellons' lowbias32 (improved constants) on uint32: `hash_dropout.mix32`'s function."""
    h = h ^ (h >> 16)
    h = h * 0x21F0AAAD
    h = h ^ (h >> 15)
    h = h * 0x735A2D97
    return h ^ (h >> 15)


@triton.jit
def score_bits(r, c):
    """The keep bits' source of one score from its row and column hashes (uint32)."""
    h = (r ^ c) * 0x21F0AAAD
    return (h ^ (h >> 15)) * 0x735A2D97


@triton.jit
def col_hash(cols, k_col):
    """A key column's half of the keep bits: one multiply-add. Each thread holds many columns of a
    block, so a full `mix32` here cost ~5 instructions per score (counted in the SASS); `score_bits`
    mixes enough after the xor with the row's full hash (statistics: bench/NOTES.md, stop 15)."""
    return cols.to(tl.uint32) * 0x2545F491 + k_col


@triton.jit
def head_keys(KEY, head):
    """The call's key (a device scalar: nothing syncs) and the head -> (k_row, k_col), uint32."""
    hk = mix32(tl.load(KEY).to(tl.uint32) + head.to(tl.uint32) * 0x7F4A7C15)
    return mix32(hk ^ 0x1B873593), mix32(hk ^ 0x5BD1E995)


@triton.jit
def fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, r, k_col, n0, start, length, qk_scale, drop_thr, stride_t,
              BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr, MASKED: tl.constexpr):
    """One block of keys of the online softmax. MASKED only for the segment's last, partial block: the
    full ones skip the bounds checks (one select per score fewer)."""
    cols = n0 + tl.arange(0, BLOCK_N)
    keys = (start + cols).to(tl.int64)
    if MASKED:
        col_ok = cols < length
        k = tl.load(k_ptrs + keys[:, None] * stride_t, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptrs + keys[:, None] * stride_t, mask=col_ok[:, None], other=0.0)
        s = tl.where(col_ok[None, :], tl.dot(q, tl.trans(k)), float("-inf"))  # (BLOCK_M, BLOCK_N), unscaled
    else:
        k = tl.load(k_ptrs + keys[:, None] * stride_t)
        v = tl.load(v_ptrs + keys[:, None] * stride_t)
        s = tl.dot(q, tl.trans(k))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])  # one FMA per score
    l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser counts every probability, dropped or not
    if DROPOUT:
        c = col_hash(cols, k_col)
        p = tl.where(score_bits(r[:, None], c[None, :]) >= drop_thr.to(tl.uint32), p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["drop_thr"])
def attn_fwd(
    QKV, O, LSE, CU, KEY, qk_scale, drop_thr, drop_scale, stride_t, stride_ot, N, HD,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr,
):
    pid_m, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length = segment(CU, seq)
    if pid_m * BLOCK_M >= length:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < length
    rows = (start + offs_m).to(tl.int64)
    q = tl.load(QKV + rows[:, None] * stride_t + head * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    # K and V load as (BLOCK_N, D) tiles, D contiguous (16-byte asynchronous copies in the SASS).
    k_ptrs = QKV + HD + head * D + offs_d[None, :]
    v_ptrs = QKV + 2 * HD + head * D + offs_d[None, :]
    k_col = 0
    r = offs_m
    if DROPOUT:
        k_row, k_col = head_keys(KEY, head)
        r = mix32((start + offs_m).to(tl.uint32) ^ k_row)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    full = (length // BLOCK_N) * BLOCK_N
    for n0 in range(0, full, BLOCK_N):
        acc, l_i, m_i = fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, r, k_col, n0, start, length, qk_scale,
                                  drop_thr, stride_t, BLOCK_N, DROPOUT, False)
    if full < length:
        acc, l_i, m_i = fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, r, k_col, full, start, length, qk_scale,
                                  drop_thr, stride_t, BLOCK_N, DROPOUT, True)
    # l_i >= 1: the row's largest score contributes exp2(0). 1 / (1 - p) applied once, here. LSE in base 2
    # of the scaled scores: m_i already carries qk_scale.
    acc = acc * (drop_scale / l_i)[:, None]
    tl.store(O + rows[:, None] * stride_ot + head * D + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + head * N + start + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def attn_bwd_delta(O, DO, LSE, DELTA, LSEB, ROWH, KEY, drop_scale, stride_ot, stride_dot, N, D: tl.constexpr,
                   BLOCK: tl.constexpr, DROPOUT: tl.constexpr):
    """Per row and head, what the backward kernels read: delta_i = dO_i . O_i (= sum_j P_ij dP_ij,
    dropout included) over s = 1 / (1 - p); with dropout also LSEB = LSE - log2(s), so that exp2(score -
    LSEB) is s P, and the row half of the keep bits, mix32(i ^ k_row), into ROWH (heads, N) uint32
    (stored as int32).

    Why: the kernels then take s P straight from their exp2 (dS = s P (keep dP - delta / s), dV = sum
    keep s P dO) instead of a multiply by s per score; and the dK/dV loop, which runs over queries
    with ~16 of them per thread and block, no longer hashes them: that cost ~4.5 instructions per
    score in its SASS (64 x 128), here it is once per row."""
    head = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    ok = offs < N
    rows = offs.to(tl.int64)
    o = tl.load(O + rows[:, None] * stride_ot + head * D + offs_d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + head * D + offs_d[None, :], mask=ok[:, None], other=0.0)
    tl.store(DELTA + head * N + offs, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) / drop_scale, mask=ok)
    if DROPOUT:
        lse = tl.load(LSE + head * N + offs, mask=ok, other=0.0)
        tl.store(LSEB + head * N + offs, lse - tl.log2(drop_scale), mask=ok)
        k_row, _ = head_keys(KEY, head)
        r = mix32(offs.to(tl.uint32) ^ k_row)
        tl.store(ROWH + head * N + offs, r.to(tl.int32, bitcast=True), mask=ok)


@triton.jit
def segment(CU, seq):
    """(start, length) of segment `seq`."""
    start = tl.load(CU + seq)
    return start, tl.load(CU + seq + 1) - start


@triton.jit
def query_rows(QKV, DO, LSE, DELTA, ROWH, start, qi, length, head, stride_t, stride_dot, N, D: tl.constexpr,
               DROPOUT: tl.constexpr):
    """q, dO (BLOCK, D) and LSE, delta, the row hashes (BLOCK,) of the segment's queries `qi`. Rows past
    the segment load q = dO = 0 and LSE = delta = 0, so their terms in dK and dV vanish."""
    row_ok = qi < length
    rows = (start + qi).to(tl.int64)
    offs_d = tl.arange(0, D)
    q = tl.load(QKV + rows[:, None] * stride_t + head * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + head * D + offs_d[None, :], mask=row_ok[:, None],
                 other=0.0)
    lse = tl.load(LSE + head * N + start + qi, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + head * N + start + qi, mask=row_ok, other=0.0)
    r = qi
    if DROPOUT:
        r = tl.load(ROWH + head * N + start + qi, mask=row_ok, other=0).to(tl.uint32, bitcast=True)
    return q, do, lse, delta, r


@triton.jit(do_not_specialize=["drop_thr"])
def attn_bwd_dkdv(
    QKV, DO, LSE, DELTA, ROWH, DQKV, DQ32, CU, KEY, qk_scale, sm_scale, drop_thr, stride_t,
    stride_dot, N, HD, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr,
    FUSED: tl.constexpr,
):
    """dK and dV of one block of keys: a loop over the segment's queries (transposed scores).

    FUSED: dQ too (FlashAttention-2's layout): each score's exp2 and keep bit are computed once instead
    of twice (here and in `attn_bwd_dq`); dQ is accumulated with fp32 atomic adds into DQ32 (N, heads,
    D), zeroed before, so its summation order varies from run to run (as FlashAttention-2's)."""
    pid_n, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length = segment(CU, seq)
    if pid_n * BLOCK_N >= length:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    col_ok = cols < length
    keys = (start + cols).to(tl.int64)
    kv_off = keys[:, None] * stride_t + head * D + offs_d[None, :]
    k = tl.load(QKV + HD + kv_off, mask=col_ok[:, None], other=0.0)  # (BLOCK_N, D)
    v = tl.load(QKV + 2 * HD + kv_off, mask=col_ok[:, None], other=0.0)
    if DROPOUT:
        _, k_col = head_keys(KEY, head)
        c = col_hash(cols, k_col)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for m0 in range(0, length, BLOCK_M):
        qi = m0 + offs_m
        q, do, lse, delta, r = query_rows(QKV, DO, LSE, DELTA, ROWH, start, qi, length, head, stride_t,
                                          stride_dot, N, D, DROPOUT)
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
        if FUSED:  # keys past the segment must not reach dQ (exp2(0 - LSE) can overflow)
            p_t = tl.where(col_ok[:, None], p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do))
        if DROPOUT:
            keep = score_bits(r[None, :], c[:, None]) >= drop_thr.to(tl.uint32)
            dv += tl.dot(tl.where(keep, p_t, 0.0).to(do.dtype), do)  # p_t = s P: LSE is LSEB here
            dp_t = tl.where(keep, dp_t, 0.0)
        else:
            dv += tl.dot(p_t.to(do.dtype), do)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk += tl.dot(ds_t, q)
        if FUSED:
            dq = tl.dot(tl.trans(ds_t), k) * sm_scale  # (BLOCK_M, D)
            dq_ptrs = DQ32 + (start + qi).to(tl.int64)[:, None] * HD + head * D + offs_d[None, :]
            tl.atomic_add(dq_ptrs, dq, mask=(qi < length)[:, None], sem="relaxed")
    tl.store(DQKV + HD + kv_off, (dk * sm_scale).to(DQKV.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DQKV + 2 * HD + kv_off, dv.to(DQKV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit(do_not_specialize=["drop_thr"])
def attn_bwd_dq(
    QKV, DO, LSE, DELTA, ROWH, DQKV, CU, KEY, qk_scale, sm_scale, drop_thr, stride_t, stride_dot,
    N, HD, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr,
):
    """dQ of one block of queries: a loop over the segment's keys."""
    pid_m, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length = segment(CU, seq)
    if pid_m * BLOCK_M >= length:
        return
    qi = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = qi < length
    q_off = (start + qi).to(tl.int64)[:, None] * stride_t + head * D + offs_d[None, :]
    q, do, lse, delta, r = query_rows(QKV, DO, LSE, DELTA, ROWH, start, qi, length, head, stride_t,
                                      stride_dot, N, D, DROPOUT)
    if DROPOUT:
        _, k_col = head_keys(KEY, head)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, length, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < length
        kv_off = (start + cols).to(tl.int64)[:, None] * stride_t + head * D + offs_d[None, :]
        k = tl.load(QKV + HD + kv_off, mask=col_ok[:, None], other=0.0)  # (BLOCK_N, D)
        v = tl.load(QKV + 2 * HD + kv_off, mask=col_ok[:, None], other=0.0)
        # Keys past the segment: p = 0 (exp2(0 - LSE) could overflow for a very negative LSE).
        p = tl.where(col_ok[None, :], tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        if DROPOUT:
            c = col_hash(cols, k_col)
            dp = tl.where(score_bits(r[:, None], c[None, :]) >= drop_thr.to(tl.uint32), dp, 0.0)
        dq += tl.dot((p * (dp - delta[:, None])).to(k.dtype), k)
    tl.store(DQKV + q_off, (dq * sm_scale).to(DQKV.dtype.element_ty), mask=row_ok[:, None])

