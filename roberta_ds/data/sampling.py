"""The global sample order, blending and rank slicing: pure functions of (seed, epoch, sample index).

Counter-based randomness
    `mix64` is splitmix64's finaliser (a bijection on uint64 with full avalanche) applied elementwise
    with numpy; `hash64(a, b, ...)` chains it over its arguments. Every random decision of the data
    pipeline (order, blend, masks) is such a hash of the indices it concerns, so it depends on
    nothing else: not on worker count, world size, batch composition or what ran before.

Permutations without tables
    `permute(x, n, key)` is a keyed bijection of [0, n): a 4-round Feistel network on the smallest
    even number of bits covering n, with cycle walking (re-encrypt until the value falls below n;
    fewer than 4 rounds trips on average). O(1) memory and vectorised, so an epoch of billions of
    samples needs no shuffle-index file (Megatron caches one; ranks race on it) and no per-worker
    table.

The sample stream (blend of S sources with n_i blocks and weights w_i)
    Epoch size N = sum_i c_i with c_i = max(1, floor(w_i / sum(w) * sum_j n_j + 1/2)): each source
    contributes c_i samples per epoch (c_i = n_i when the weights follow the sizes, i.e. one true
    epoch). Source i's own stream is the concatenation over its epochs f of
    permute(., n_i, key(seed, i, f)) (the identity when c_i = n_i: every epoch then holds all of
    the source's blocks, and the global permutation shuffles them anyway); global epoch e takes
    items [e c_i, (e + 1) c_i) of it, so a down-weighted source moves on through its data from epoch
    to epoch rather than repeating a prefix. The global epoch e is permute(., N, key(seed, e)) of
    the concatenation of the sources' contributions. Sample k of the stream is in epoch k // N.

Rank slicing
    Global batch g is stream samples [g B, (g + 1) B), B = micro_batch * grad_accum * world_size.
    Its local sample j goes to micro-step j // (micro_batch * world_size), rank
    (j % (micro_batch * world_size)) // micro_batch. The samples a global batch consumes depend only
    on B, never on how it is split across ranks and micro-steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_ODD = np.uint64(0xD6E8FEB86659FD93)  # odd multiplier spreading small counters (positions) over 64 bits
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
FEISTEL_ROUNDS = 4  # Luby-Rackoff: 4 rounds of a pseudo-random function give a strong permutation

# Domain tags, so that no two uses of the hash share inputs.
TAG_EPOCH_ORDER = 0x4F52444552  # "ORDER"
TAG_SOURCE_ORDER = 0x534F555243  # "SOURC"


def as_u64(x: np.ndarray | int) -> np.ndarray:
    """Any integer (array), negative ones included, reinterpreted as uint64 (two's complement)."""
    a = np.asarray(x)
    if a.dtype == np.uint64:
        return a
    if a.dtype.kind == "u":
        return a.astype(np.uint64)
    if a.dtype.kind in "ib":
        return a.astype(np.int64).view(np.uint64)
    raise TypeError(f"expected integers, got {a.dtype}")


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic; a bijection)."""
    z = as_u64(x)
    if z.ndim == 0:  # numpy warns on scalar overflow only; the wrap-around is intended
        with np.errstate(over="ignore"):
            return _mix(z)
    return _mix(z)


def _mix(z: np.ndarray) -> np.ndarray:
    z = z + _GOLDEN
    z ^= z >> _S30
    z *= _M1
    z ^= z >> _S27
    z *= _M2
    z ^= z >> _S31
    return z


def hash64(*parts: np.ndarray | int) -> np.ndarray:
    """Hash of a tuple of integers (arrays broadcast): mix64 chained over the parts."""
    h = np.uint64(0x243F6A8885A308D3)
    for p in parts:
        h = mix64(h ^ as_u64(p))
    return h


def uniform(h: np.ndarray) -> np.ndarray:
    """uint64 hash -> float64 uniform in [0, 1) (top 53 bits)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _half_bits(n: np.ndarray) -> np.ndarray:
    """Per element, the least h with 4**h >= n (the Feistel domain is 2h bits), as uint64."""
    values, inverse = np.unique(n, return_inverse=True)  # few distinct sizes: one per source
    halves = [(max(int(v), 1) - 1).bit_length() for v in values]
    return np.asarray([(b + 1) // 2 for b in halves], dtype=np.uint64)[inverse.reshape(n.shape)]


def _feistel(x: np.ndarray, h: np.ndarray, keys: list[np.ndarray]) -> np.ndarray:
    mask = (np.uint64(1) << h) - np.uint64(1)
    left, right = x >> h, x & mask
    for k in keys:
        left, right = right, left ^ (mix64(right ^ k) & mask)
    return (left << h) | right


def permute(x: np.ndarray | int, n: np.ndarray | int, key: np.ndarray | int) -> np.ndarray:
    """Keyed pseudo-random bijection of [0, n), elementwise (x, n and key broadcast). Returns int64."""
    x, n, key = np.broadcast_arrays(as_u64(x), as_u64(n), as_u64(key))
    x, n, key = x.copy(), n.copy(), key.copy()
    if (x >= n).any():
        raise ValueError("permute: every x must be < n")
    h = _half_bits(n)
    keys = [mix64(key ^ np.uint64(r + 1)) for r in range(FEISTEL_ROUNDS)]
    todo = np.arange(x.size)
    xf, hf, nf = x.reshape(-1), h.reshape(-1), n.reshape(-1)
    kf = [k.reshape(-1) for k in keys]
    while todo.size:  # cycle walking: re-encrypt the values that left [0, n)
        y = _feistel(xf[todo], hf[todo], [k[todo] for k in kf])
        xf[todo] = y
        todo = todo[y >= nf[todo]]
    return xf.view(np.int64).reshape(x.shape)


@dataclass(frozen=True)
class Blend:
    """Where each sample of the stream comes from (see the module docstring)."""

    sizes: tuple[int, ...]
    """Blocks per source, n_i."""
    counts: tuple[int, ...]
    """Samples per epoch from each source, c_i."""
    seed: int

    @classmethod
    def make(cls, sizes: list[int], weights: list[float], seed: int) -> Blend:
        if len(sizes) != len(weights) or not sizes:
            raise ValueError("Blend.make: need one weight per source and at least one source")
        if min(sizes) < 1:
            raise ValueError("Blend.make: every source needs at least one block")
        total, wsum = sum(sizes), float(sum(weights))
        counts = tuple(max(1, int(np.floor(w / wsum * total + 0.5))) for w in weights)
        return cls(tuple(int(s) for s in sizes), counts, int(seed))

    @property
    def epoch_size(self) -> int:
        return sum(self.counts)

    def locate(self, k: np.ndarray | int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stream sample indices k -> (source, block within source, epoch), each int64 like k."""
        k = np.asarray(k, dtype=np.int64)
        if (k < 0).any():
            raise ValueError("sample indices must be >= 0")
        big_n = self.epoch_size
        epoch, r = np.divmod(k, big_n)
        q = permute(r, big_n, hash64(TAG_EPOCH_ORDER, self.seed, epoch))
        cum = np.cumsum((0,) + self.counts)
        src = np.searchsorted(cum, q, side="right") - 1
        counts, sizes = np.asarray(self.counts)[src], np.asarray(self.sizes)[src]
        u = epoch * counts + (q - cum[src])  # position in source src's own stream
        src_epoch, v = np.divmod(u, sizes)
        block = v.copy()
        shuffled = counts != sizes  # a source read exactly once per epoch needs no order of its own
        if shuffled.any():
            block[shuffled] = permute(
                v[shuffled],
                sizes[shuffled],
                hash64(TAG_SOURCE_ORDER, self.seed, src[shuffled], src_epoch[shuffled]),
            )
        return src, block, epoch


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is split: global_batch = micro_batch x grad_accum x
    world_size, checked here, the one place it is multiplied out. engine/ds_config.batch_plan builds it
    from the DeepSpeed config; the loader and the trainer read it."""

    global_batch: int
    micro_batch: int
    grad_accum: int
    world_size: int

    def __post_init__(self) -> None:
        parts = (self.micro_batch, self.grad_accum, self.world_size)
        if min(parts) < 1 or self.global_batch != self.micro_batch * self.grad_accum * self.world_size:
            raise ValueError(f"BatchPlan: global_batch {self.global_batch} must equal micro_batch x grad_accum x "
                             f"world_size = {' x '.join(map(str, parts))}, each >= 1")

    @classmethod
    def of(cls, micro_batch: int, grad_accum: int, world_size: int) -> BatchPlan:
        return cls(micro_batch * grad_accum * world_size, micro_batch, grad_accum, world_size)

    @property
    def per_micro_step(self) -> int:
        """Samples one micro-step takes over all ranks."""
        return self.micro_batch * self.world_size


def micro_batch_indices(plan: BatchPlan, step: int, micro_step: int, rank: int) -> np.ndarray:
    """Stream sample indices of (global batch `step`, micro-step, rank): (micro_batch,) int64."""
    if not (0 <= micro_step < plan.grad_accum and 0 <= rank < plan.world_size and step >= 0):
        raise ValueError(
            f"micro_batch_indices: need step >= 0 ({step}), 0 <= micro_step < grad_accum ({micro_step}, "
            f"{plan.grad_accum}), 0 <= rank < world_size ({rank}, {plan.world_size})"
        )
    first = step * plan.global_batch + micro_step * plan.per_micro_step + rank * plan.micro_batch
    return np.arange(first, first + plan.micro_batch, dtype=np.int64)
