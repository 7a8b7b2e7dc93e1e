"""Context-free baselines for masked-LM numbers, from a shard set's token counts.

A predictor that ignores context gives every masked position the same distribution q. On tokens with
empirical distribution p its mean cross-entropy is H(p) + KL(p || q) >= H(p), the unigram entropy
(nats), and its top-1 accuracy is at most max p, the top-1 share. Both bounds are exact on the counted
tokens, so a validation loss below the validation tokens' H(p), or an accuracy above their max p,
can only come from context. The counted tokens are the maskable ones: every id except the manifest's
special ids (the masking rule of masking.py).

Where the numbers come from:
- a shard set's manifest carries them as `token_stats` (`with_token_stats`, run by every tool that
  writes a manifest: build-shards, build-shards-parallel, merge);
- a set without them (built before they existed, or by another tool) is counted on the fly: one
  bincount pass over its shards, split across ranks and summed (`run_baselines`);
- several sets: the union of their counts (validation), or the blend's mixture (training: each set's
  counts weighted by the samples per block the blend draws from it), so they are counted too.

    stats = UnigramStats.from_counts(counts, special_ids)     # counts: (V,) int64
    stats.entropy, stats.top1                                  # nats; a share in [0, 1]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from roberta_ds.data.shard_set import Manifest, read_manifest
from roberta_ds.data.shards import MANIFEST_NAME, ShardReader
from roberta_ds.errors import ShardFormatError

FIELD = "token_stats"
"""The manifest field (format version 1, optional: see the compatibility rule in shard_set.py)."""
DECIMALS = 6
"""Rounding of the stored floats: the manifest's bytes do not depend on summation order."""


@dataclass(frozen=True)
class UnigramStats:
    """Unigram statistics of a set of maskable tokens."""

    maskable_tokens: int
    """Tokens counted (every token that is not a special id; for a blend's mixture, weighted)."""
    entropy: float
    """H(p) = -sum p log p over the maskable ids, in nats: the least mean loss of any context-free predictor."""
    top1: float
    """max p: the share of the most frequent maskable id, the best accuracy of any context-free predictor."""
    top1_id: int
    """That id (the lowest one on a tie); -1 when nothing was counted."""

    @classmethod
    def from_counts(cls, counts: np.ndarray, special_ids: dict[str, int]) -> UnigramStats:
        """From per-id counts (integers, or the blend's non-negative weighted counts)."""
        c = np.asarray(counts, dtype=np.float64).copy()
        c[[i for i in special_ids.values() if 0 <= i < len(c)]] = 0.0
        total = float(c.sum())
        if total <= 0:
            return cls(0, 0.0, 0.0, -1)
        p = c[c > 0] / total
        entropy = float(-(p * np.log(p)).sum())
        top = int(np.argmax(c))
        return cls(round(total), round(max(entropy, 0.0), DECIMALS), round(float(c[top] / total), DECIMALS), top)

    def to_manifest(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_manifest(cls, raw: Any, where: str) -> UnigramStats:
        """Parse and check the manifest field; errors name the file and the field."""
        if not isinstance(raw, dict):
            raise ShardFormatError(f"{where}: field {FIELD!r} must be an object, got {type(raw).__name__}")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in raw]
        if missing:
            raise ShardFormatError(f"{where}: field {FIELD!r} lacks {missing}")
        try:
            stats = cls(int(raw["maskable_tokens"]), float(raw["entropy"]), float(raw["top1"]), int(raw["top1_id"]))
        except (TypeError, ValueError) as e:
            raise ShardFormatError(f"{where}: field {FIELD!r} is malformed ({e})") from None
        if stats.maskable_tokens < 0 or not 0 <= stats.top1 <= 1 or not 0 <= stats.entropy < 64:
            raise ShardFormatError(f"{where}: field {FIELD!r} holds impossible values {raw}")
        return stats


def count_tokens(directory: str | Path, manifest: Manifest, shards: Sequence[int] | None = None) -> np.ndarray:
    """(vocab_size,) int64 counts of every token id in the set's shards (or the shards with these
    indices in the manifest's list). Ids at or beyond vocab_size are refused, naming the file."""
    counts = np.zeros(manifest.vocab_size, dtype=np.int64)
    infos = manifest.shards if shards is None else [manifest.shards[i] for i in shards]
    for info in infos:
        for _, tokens in ShardReader(Path(directory) / info.name).iter_token_chunks():
            part = np.bincount(tokens)
            if len(part) > len(counts):
                raise ShardFormatError(
                    f"{Path(directory) / info.name}.bin: holds token id {len(part) - 1}, outside the vocabulary "
                    f"of {manifest.vocab_size} in {Path(directory) / MANIFEST_NAME}"
                )
            counts[: len(part)] += part
    return counts


def with_token_stats(directory: str | Path, manifest: Manifest) -> Manifest:
    """`manifest` with its `token_stats` counted from the set's finished shards (one bincount pass);
    writers call it just before `write_manifest`."""
    stats = UnigramStats.from_counts(count_tokens(directory, manifest), manifest.special_ids)
    return dataclasses.replace(manifest, token_stats=stats.to_manifest())


def stored_stats(directory: str | Path, manifest: Manifest) -> UnigramStats | None:
    """The manifest's `token_stats`, or None for a set whose manifest predates them."""
    if manifest.token_stats is None:
        return None
    return UnigramStats.from_manifest(manifest.token_stats, str(Path(directory) / MANIFEST_NAME))


def check_stored_stats(directory: str | Path, manifest: Manifest) -> None:
    """`verify`: the stored statistics equal a recount of the shards (absent ones are not an error)."""
    stored = stored_stats(directory, manifest)
    if stored is None:
        return
    actual = UnigramStats.from_counts(count_tokens(directory, manifest), manifest.special_ids)
    # Counts compare exactly; the floats within rounding (log's last bit differs across SIMD kernels).
    same = (stored.maskable_tokens, stored.top1_id) == (actual.maskable_tokens, actual.top1_id) and all(
        abs(a - b) <= 2 * 10**-DECIMALS for a, b in ((stored.entropy, actual.entropy), (stored.top1, actual.top1)))
    if not same:
        raise ShardFormatError(
            f"{Path(directory) / MANIFEST_NAME}: field {FIELD!r} says {stored.to_manifest()}, the shards give "
            f"{actual.to_manifest()}; rebuild the set (or delete the field: it is then counted when needed)"
        )


# ----------------------------------------------------------------------------------------------
# A run's baselines


AllReduce = Callable[[np.ndarray], np.ndarray]
"""Sums an int64 array over every rank (identity on one process)."""


def group_counts(
    paths: Sequence[str], rank: int, world: int, all_reduce: AllReduce
) -> tuple[list[Manifest], np.ndarray]:
    """Every set's counts, (len(paths), V): shards dealt round-robin to ranks, then summed across ranks.
    Every rank must call it (a collective)."""
    manifests = [read_manifest(p) for p in paths]
    vocab = max(m.vocab_size for m in manifests)
    counts = np.zeros((len(paths), vocab), dtype=np.int64)
    jobs = [(s, i) for s, m in enumerate(manifests) for i in range(len(m.shards))]
    for s, i in jobs[rank::world]:
        c = count_tokens(paths[s], manifests[s], [i])
        counts[s, : len(c)] += c
    return manifests, all_reduce(counts)


def group_stats(
    paths: Sequence[str],
    weights: Sequence[float] | None,
    rank: int,
    world: int,
    all_reduce: AllReduce,
    log: Callable[[str], None] = lambda _: None,
) -> UnigramStats:
    """The statistics of several sets taken together: one set's stored ones when it has them; else
    every set counted, then their union (weights None) or their mixture (counts x weights)."""
    if len(paths) == 1:
        m = read_manifest(paths[0])
        stored = stored_stats(paths[0], m)
        if stored is not None:
            return stored
    manifests, counts = group_counts(paths, rank, world, all_reduce)
    old = [p for p, m in zip(paths, manifests) if m.token_stats is None]
    log(f"counted the tokens of {', '.join(map(str, paths))} for the unigram baseline"
        + (f" ({', '.join(map(str, old))}: manifest without {FIELD}; a rebuild stores them)" if old else ""))
    w = np.ones(len(paths)) if weights is None else np.asarray(weights, dtype=np.float64)
    return UnigramStats.from_counts((counts * w[:, None]).sum(axis=0), manifests[0].special_ids)


def metric_fields(prefix: str, stats: UnigramStats) -> dict[str, float]:
    """The metrics.jsonl / TensorBoard fields of a baseline: `<prefix>unigram_entropy`, `<prefix>unigram_top1`."""
    return {f"{prefix}unigram_entropy": stats.entropy, f"{prefix}unigram_top1": stats.top1}


def describe(name: str, stats: UnigramStats) -> str:
    """One log line: the baseline of `name` (e.g. "validation")."""
    return (f"{name}: unigram entropy {stats.entropy:.4f} nats (ppl {math.exp(stats.entropy):,.1f}), top-1 share "
            f"{100 * stats.top1:.2f}% (id {stats.top1_id}) over {stats.maskable_tokens:,} maskable tokens")
