"""Attention kernels for the encoder: SDPA with a key-padding mask, or FlashAttention-2 over segments.

`model.attention_kernel` picks one; both give the same outputs at real positions and the same loss
and gradients (padding positions never reach the loss):

- "sdpa": `F.scaled_dot_product_attention` with a (B, 1, 1, T) key-padding mask. On Hopper GPUs
  PyTorch runs cuDNN's fused attention for it (bench/model_check.py shows which kernel runs); a mask
  rules out PyTorch's own FlashAttention-2 kernel.
- "varlen": the (B, T) batch is seen as 2B variable-length segments laid end to end, each row's real
  tokens and then its padding: cu_seqlens = [0, n_0, T, T + n_1, 2T, ..., (B-1)T + n_{B-1}, BT].
  A real query attends exactly to its row's real keys, as under the key mask; padding attends only
  to padding. FlashAttention-2's varlen kernel (`aten._flash_attention_forward`, the kernel behind
  nested-tensor SDPA) takes that with dropout on the probabilities and no mask at all. Shapes stay
  static (2B + 1 offsets, BT positions), so torch.compile needs no dynamic shapes and nothing waits
  on the host. Off CUDA, or in fp32 (which the kernel lacks), the same segments run through SDPA
  with a block mask, so CPU tests check the semantics.

With `model.unpad` the layers run on the real tokens only, packed into one (1, N, H) sequence (the
loader's `unpad_index`); the varlen kernel then takes one segment per row: offsets [0, n_0, n_0 + n_1,
..., N] (`packed_offsets`), at most T long each.

Both need right-padded rows (padding only after the last real token), which our loader guarantees
(`roberta_ds.data.masking.check_right_padded`). Position 0 counts as real in every row (see `key_mask`), so
a row of padding only is one token long, never empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FLASH_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class AttentionInputs:
    """What every layer's attention needs, built once per forward (`attention_inputs`)."""

    kernel: str
    """sdpa | varlen"""
    mask: torch.Tensor | None
    """sdpa: the (B, 1, 1, T) key mask; varlen: the segment offsets; None: no padding at all."""
    max_len: int | None = None
    """varlen: a bound on every segment's length (the packed layout's T); default the row length."""


def key_mask(keep: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True = a real token -> (B, 1, 1, T) SDPA mask (True = may be attended to).

    Column 0 is always kept: in a right-padded batch it is `<s>` of every real row, and a row made
    only of padding would otherwise have no key at all, give NaN, and a NaN in any activation
    poisons every weight gradient (0 x NaN = NaN in the matmul backward) even with label -100.
    """
    keep = keep.clone()
    keep[:, 0] = True
    return keep[:, None, None, :]


def real_tokens(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, T) ids -> (B, T) bool, True at real tokens and at position 0 of every row (as the key mask
    keeps it): the positions the unpadded layout holds."""
    keep = input_ids.ne(pad_id)
    keep[:, 0] = True
    return keep


def packed_offsets(keep: torch.Tensor) -> torch.Tensor:
    """(B, T) bool from `real_tokens` -> (B + 1,) int32 offsets of each row's tokens in the packed (N,)
    layout: [0, n_0, n_0 + n_1, ..., N]."""
    lengths = keep.sum(dim=1, dtype=torch.int32)
    return torch.cat((lengths.new_zeros(1), torch.cumsum(lengths, 0, dtype=torch.int32)))


def segment_offsets(keep: torch.Tensor) -> torch.Tensor:
    """(B, T) bool real-token flags of right-padded rows -> (2B + 1,) int32 cumulative segment offsets
    [0, n_0, T, T + n_1, ..., BT]: segment 2b is row b's n_b real tokens, 2b + 1 its padding (empty for
    a full row). Computed on the device without a sync."""
    b, t = keep.shape
    starts = torch.arange(b, device=keep.device, dtype=torch.int32) * t
    ends = starts + keep.sum(dim=1, dtype=torch.int32).clamp(min=1)  # position 0 is real (`key_mask`)
    inner = torch.stack((starts, ends), dim=1).flatten()
    return torch.cat((inner, inner.new_full((1,), b * t)))


def segment_mask(offsets: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """The block mask the varlen kernel implies, for SDPA: offsets of segments laid end to end over the
    b x t positions (none crossing a row) -> (b, 1, t, t) bool, True where query i and key j lie in
    the same segment. Serves both layouts: padded (2B + 1 offsets, b = B) and packed (B + 1, b = 1)."""
    flat = torch.arange(b * t, device=offsets.device, dtype=offsets.dtype)
    seg = torch.searchsorted(offsets[1:], flat, right=True).view(b, t)  # empty segments are skipped
    return (seg[:, :, None] == seg[:, None, :])[:, None]


def flash_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, max_len: int, dropout_p: float
) -> torch.Tensor:
    """FlashAttention-2 over segments. q, k, v (N, heads, head_dim) with a unit last stride, bf16 or
    fp16 on CUDA; offsets (S + 1,) int32 -> (N, heads, head_dim). Differentiable: autograd calls
    `aten._flash_attention_backward` with the forward's RNG state, so the dropout mask is replayed."""
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, offsets, offsets, max_len, max_len, dropout_p, False, False, scale=None
    )
    return out[0]


def use_flash(q: torch.Tensor) -> bool:
    """Whether the varlen kernel can run these queries (static under torch.compile)."""
    return q.is_cuda and q.dtype in FLASH_DTYPES


def attend(qkv: torch.Tensor, inputs: AttentionInputs, dropout_p: float) -> torch.Tensor:
    """Multi-head attention of a fused projection: qkv (B, T, 3, heads, head_dim) -> (B, T, heads x
    head_dim), B = 1 in the packed layout."""
    b, t, _, h, d = qkv.shape
    mask = inputs.mask
    segments = inputs.kernel == "varlen" and mask is not None
    if segments and use_flash(qkv):
        q, k, v = qkv.reshape(b * t, 3, h, d).unbind(1)  # each (BT, heads, head_dim), row stride 3hd
        return flash_varlen(q, k, v, mask, inputs.max_len or t, dropout_p).reshape(b, t, h * d)
    if segments:
        mask = segment_mask(mask, b, t)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return y.transpose(1, 2).reshape(b, t, h * d)


def attention_inputs(keep: torch.Tensor | None, kernel: str) -> AttentionInputs:
    """For a (B, T) batch: the key mask (sdpa) or the segment offsets (varlen) of its real-token
    flags; no mask when the batch holds no padding (keep None)."""
    if keep is None:
        return AttentionInputs(kernel, None)
    return AttentionInputs(kernel, segment_offsets(keep) if kernel == "varlen" else key_mask(keep))


def packed_inputs(keep: torch.Tensor) -> AttentionInputs:
    """For the packed (1, N) layout of a (B, T) batch's real tokens: one varlen segment per row."""
    return AttentionInputs("varlen", packed_offsets(keep), keep.shape[1])
