"""Dropout whose mask comes from a counter-based integer hash, for compiled GPU training.

`nn.Dropout` under torch.compile becomes inductor's `tl.rand(seed, offset)`: one full Philox4x32-10
call (ten rounds of two 32 x 32 -> 64-bit multiplies) per element, of which it keeps one of four
outputs, so the fused residual-add + dropout + LayerNorm kernel of every layer is bound by that
arithmetic rather than by memory (measurements: bench/NOTES.md).
`model.dropout_rng: hash` draws the keep mask from a keyed integer hash of the element's index
instead: two rounds of Wellons' improved `lowbias32` (four multiplies in all), fused by inductor into
the same kernel, and cheap enough that inductor may recompute it in backward instead of saving it.
Only compiled code uses it (`torch.compiler.is_compiling()`): in eager mode the hash costs a dozen
full-size temporaries, so eager runs keep `nn.Dropout`'s kernel.

What stays as in `nn.Dropout`: each element is kept independently with probability 1 - p (p is
rounded to a multiple of 2^-32) and scaled by 1 / (1 - p); a fresh key per call comes from torch's
generator (`torch.randint` on the tensor's device), so masks change every step and layer and replay
exactly from a restored RNG state (resume, activation checkpointing). What differs: the bits come
from a hash, not Philox, so a mask is not the one `nn.Dropout` would draw from the same state
(nor is a compiled `nn.Dropout`'s the eager one's). tests/test_hash_dropout.py checks keep rate,
unbiasedness, pairwise independence between neighbours, calls and keys.

The arithmetic is int32 (on a GPU int64 costs two to four instructions per operation): products wrap
modulo 2^32 as the hash wants (two's complement on CPU and in Triton), right shifts are made logical
by masking, and the unsigned comparison with the threshold flips the sign bit of both sides. The
element index must stay below 2^31 per call (checked when the shape is static; a dynamic token count
reaches that at 2.8M tokens x 768).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Wellons' "lowbias32" with the improved constants (hash-prospector); both fit in an int32.
MUL1, MUL2 = 0x21F0AAAD, 0x735A2D97
KEY_SALT = -0x61C88647  # 0x9E3779B9 as an int32: a second, unrelated key from the same draw
SIGN = -(2**31)  # flips the sign bit: unsigned order as signed order


def mix32(h: torch.Tensor) -> torch.Tensor:
    """Integer hash of int32 values (read as unsigned 32-bit) -> int32; elementwise, bijective."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * MUL1
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * MUL2
    return h ^ ((h >> 15) & 0x1FFFF)


def keep_mask(shape: torch.Size, key: torch.Tensor, p: float) -> torch.Tensor:
    """(shape) bool, True = keep, for a () int32 `key`: element i is kept when, as unsigned 32-bit
    numbers, mix32(mix32(i ^ k1) ^ k2) >= round(p * 2^32), with k1, k2 hashed from the key."""
    numel = shape.numel()
    if isinstance(numel, int) and numel >= 1 << 31:
        raise ValueError(f"hash dropout over {numel} elements: the element index must stay below 2^31")
    k1 = mix32(key)
    k2 = mix32(key ^ KEY_SALT)
    index = torch.arange(numel, device=key.device, dtype=torch.int32).view(shape)
    threshold = min(round(p * 2**32), 2**32 - 1)
    return (mix32(mix32(index ^ k1) ^ k2) ^ SIGN) >= threshold + SIGN


def hash_dropout(x: torch.Tensor, p: float, key: torch.Tensor) -> torch.Tensor:
    """x with each element zeroed with probability p and the rest scaled by 1 / (1 - p)."""
    return torch.where(keep_mask(x.shape, key, p), x * (1.0 / (1.0 - p)), 0.0).to(x.dtype)


def draw_key(device: torch.device) -> torch.Tensor:
    """A () int32 key in [0, 2^31 - 1) from torch's generator for `device` (one small draw per call;
    a scalar in the fused kernel, as inductor's CPU code shows; the Triton code is not yet read)."""
    return torch.randint(0, 2**31 - 1, (), device=device, dtype=torch.int32)


class HashDropout(nn.Module):
    """Drop-in for `nn.Dropout(p)` (training mode only; identity in eval or at p = 0)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not torch.compiler.is_compiling():
            return F.dropout(x, self.p, training=True)
        return hash_dropout(x, self.p, draw_key(x.device))

    def extra_repr(self) -> str:
        return f"p={self.p}, rng=hash"
