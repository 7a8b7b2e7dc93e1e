"""Dynamic MLM masking: pure, vectorised numpy over a whole micro-batch, plus the collator.

Randomness is a counter-based hash (sampling.hash64) of (seed, epoch, global sample index, token
position), so a row's mask depends on nothing else: not on the worker that builds it, the world
size, the rest of the batch, or what ran before. It changes every epoch (RoBERTa's dynamic masking)
and replays exactly on resume.

Per row (fairseq's MaskTokensDataset, made exact and order-free):
  * maskable tokens are those that are not special (pad, <s>, </s>, <unk>, <mask>, ...);
  * num_mask = floor(mask_prob * n_maskable + u), u uniform from the hash (an exact count whose
    expectation is mask_prob * n_maskable);
  * token masking: the num_mask maskable positions with the smallest hashed keys;
    whole-word masking: words in hashed-key order while fewer than num_mask tokens are chosen; a
    word starts at a token flagged in the tokenizer's word-start table (byte-level BPE tokens
    beginning with 'Ġ'), at a sentence's first token, or right after a special token; the first
    word that would push the count past the static slot count K ends the choice;
  * each chosen token independently: <mask> with prob 1 - random_token_prob - leave_unmasked_prob,
    a random non-special id with prob random_token_prob, unchanged otherwise (80/10/10).

Output has static shapes for the model: `input_ids` (B, T), `mlm_positions` (B, K) positions
within each row in increasing order, `mlm_labels` (B, K) the original ids, -100 in unused slots
(which point at position 0). K = mask_slots(cfg) bounds every row's count. One field varies in
length: `unpad_index` (N,), the flat indices of the real tokens, sent only for `model.unpad`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from roberta_ds.config import DataConfig
from roberta_ds.data.sampling import _ODD, hash64, mix64, uniform
from roberta_ds.errors import ConfigError, ShardFormatError

IGNORE_INDEX = -100
WHOLE_WORD_SLACK = 16
"""Extra slots for whole-word masking: the last chosen word may overshoot num_mask by its length - 1."""

# Hash streams: one per independent decision.
_COUNT, _SELECT, _ACTION, _RANDOM = (np.uint64(v) for v in (0xC0, 0x5E, 0xAC, 0x7A))


def mask_slots(cfg: DataConfig) -> int:
    """K: masked positions per row, a static bound on num_mask for every row of length max_seq_len.

    num_mask = floor(p n + u) <= ceil(p (T - 2)) for n <= T - 2 maskable tokens; +1 for float
    rounding; + WHOLE_WORD_SLACK when whole words may overshoot.
    """
    k = math.ceil(cfg.mask_prob * (cfg.max_seq_len - 2)) + 1
    if cfg.whole_word_mask:
        k += WHOLE_WORD_SLACK
    return min(k, cfg.max_seq_len)


@dataclass(frozen=True)
class MaskSpec:
    """Everything masking needs besides the ids: probabilities, special ids, slot count."""

    mask_prob: float
    random_token_prob: float
    leave_unmasked_prob: float
    mask_id: int
    pad_id: int
    special: np.ndarray
    """(V,) bool: True for ids never masked (every id in the manifest's special_ids)."""
    random_ids: np.ndarray
    """int64 ids a 'random token' is drawn from: every non-special id below vocab_size."""
    slots: int
    word_starts: np.ndarray | None = None
    """(V,) bool word-start table for whole-word masking, or None for token masking."""

    @classmethod
    def make(
        cls,
        cfg: DataConfig,
        vocab_size: int,
        special_ids: dict[str, int],
        word_starts: np.ndarray | None = None,
    ) -> MaskSpec:
        special = np.zeros(vocab_size, dtype=bool)
        for name, i in special_ids.items():
            if not 0 <= i < vocab_size:
                raise ShardFormatError(f"special id {name}={i} is outside the vocabulary of {vocab_size}")
            special[i] = True
        if cfg.whole_word_mask:
            if word_starts is None:
                raise ConfigError(
                    "data.whole_word_mask: needs the tokenizer's word-start table; pass "
                    "word_starts=roberta_ds.data.tokenizer.word_start_table(<tokenizer dir>)"
                )
            word_starts = np.asarray(word_starts, dtype=bool)
            if word_starts.ndim != 1 or len(word_starts) < vocab_size:
                raise ConfigError(
                    f"data.whole_word_mask: word-start table has shape {word_starts.shape}, "
                    f"need ({vocab_size},) for the shards' vocabulary"
                )
        else:
            word_starts = None
        return cls(
            mask_prob=cfg.mask_prob,
            random_token_prob=cfg.random_token_prob,
            leave_unmasked_prob=cfg.leave_unmasked_prob,
            mask_id=special_ids["mask"],
            pad_id=special_ids["pad"],
            special=special,
            random_ids=np.flatnonzero(~special).astype(np.int64),
            slots=mask_slots(cfg),
            word_starts=word_starts,
        )


def _choose_tokens(keys: np.ndarray, num: np.ndarray, k: int) -> np.ndarray:
    """(B, k) positions: per row the num[r] positions with the smallest keys (non-maskable keys are
    max), in increasing order, then T (= keys.shape[1]) in the unused slots."""
    b, t = keys.shape
    kk = min(k, t)
    cand = np.argpartition(keys, kk - 1, axis=1)[:, :kk]  # (B, kk) the kk smallest, unordered
    order = np.argsort(np.take_along_axis(keys, cand, axis=1), axis=1)
    cand = np.take_along_axis(cand, order, axis=1)  # (B, kk) by increasing key
    pos = np.full((b, k), t, dtype=np.int64)
    pos[:, :kk] = np.where(np.arange(kk)[None, :] < num[:, None], cand, t)
    pos.sort(axis=1)
    return pos


def _choose_words(
    maskable: np.ndarray,
    ids: np.ndarray,
    row_key: np.ndarray,
    num: np.ndarray,
    k: int,
    word_starts: np.ndarray,
    extra_starts: np.ndarray | None,
) -> np.ndarray:
    """(B, k) positions of whole words chosen in hashed-key order until num[r] tokens (never more
    than k), increasing, then T in the unused slots."""
    b, t = ids.shape
    prev_unmaskable = np.ones((b, t), dtype=bool)
    prev_unmaskable[:, 1:] = ~maskable[:, :-1]
    start = word_starts[ids] | prev_unmaskable
    if extra_starts is not None:
        start |= extra_starts
    start &= maskable  # (B, T) first token of each word
    words_per_row = start.sum(axis=1)
    row_first_word = np.cumsum(words_per_row) - words_per_row
    word_of_tok = row_first_word[:, None] + np.cumsum(start, axis=1) - 1  # (B, T) global word id
    n_words = int(words_per_row.sum())
    lengths = np.bincount(word_of_tok[maskable], minlength=n_words)  # (W,) tokens per word
    w_row, w_pos = np.nonzero(start)  # (W,) in word-id order
    w_key = mix64(row_key[w_row] ^ (w_pos.astype(np.uint64) * _ODD))
    order = np.lexsort((w_key, w_row))  # by row, then key
    csum = np.cumsum(lengths[order])
    base = np.concatenate(([0], csum))[row_first_word][w_row[order]]
    incl = csum - base  # tokens chosen in the row if this word and all before it (in key order) are
    take = ((incl - lengths[order]) < num[w_row[order]]) & (incl <= k)
    word_sel = np.zeros(n_words + 1, dtype=bool)  # +1: a dummy for non-maskable tokens
    word_sel[order[take]] = True
    chosen = maskable & word_sel[np.where(maskable, word_of_tok, n_words)]
    rows, cols = np.nonzero(chosen)  # row-major: positions increase within each row
    per_row = np.bincount(rows, minlength=b)
    pos = np.full((b, k), t, dtype=np.int64)
    pos[rows, np.arange(len(rows)) - (np.cumsum(per_row) - per_row)[rows]] = cols
    return pos


def mask_batch(
    ids: np.ndarray,
    sample_index: np.ndarray,
    epoch: np.ndarray,
    seed: int,
    spec: MaskSpec,
    sentence_starts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask a right-padded batch. ids (B, T) int64, sample_index/epoch (B,) int64; sentence_starts
    (B, T) bool, optional, marks tokens that begin a sentence (and so a word, for whole words).

    Returns (input_ids (B, T), mlm_positions (B, K), mlm_labels (B, K)), all int64; `ids` is not
    modified.
    """
    b, t = ids.shape
    k = spec.slots
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= len(spec.special)):
        raise ShardFormatError(
            f"token id out of range [0, {len(spec.special)}) in samples {sample_index.tolist()}: shards "
            "and manifest disagree (run `roberta-ds verify`)"
        )
    row_key = hash64(seed, epoch, sample_index)  # (B,) uint64
    maskable = ~spec.special[ids]  # (B, T)
    n_maskable = maskable.sum(axis=1)
    u = uniform(mix64(row_key ^ _COUNT))
    num = np.minimum(np.floor(spec.mask_prob * n_maskable + u).astype(np.int64), np.minimum(n_maskable, k))

    sel_key = mix64(row_key ^ _SELECT)
    if spec.word_starts is None:
        pos = np.arange(t, dtype=np.uint64) * _ODD
        keys = mix64(sel_key[:, None] ^ pos[None, :]) >> np.uint64(1)  # (B, T), < 2**63
        keys[~maskable] = np.iinfo(np.uint64).max
        pos = _choose_tokens(keys, num, k)
    else:
        pos = _choose_words(maskable, ids, sel_key, num, k, spec.word_starts, sentence_starts)

    used = pos < t  # (B, K)
    rows, slot = np.nonzero(used)
    cols = pos[rows, slot]
    labels_flat = ids[rows, cols]
    colh = cols.astype(np.uint64) * _ODD
    action = uniform(mix64(mix64(row_key[rows] ^ _ACTION) ^ colh))
    keep = action < spec.leave_unmasked_prob
    rand = ~keep & (action < spec.leave_unmasked_prob + spec.random_token_prob)
    new = np.full(len(rows), spec.mask_id, dtype=np.int64)
    r_u = uniform(mix64(mix64(row_key[rows[rand]] ^ _RANDOM) ^ colh[rand]))
    new[rand] = spec.random_ids[(r_u * len(spec.random_ids)).astype(np.int64)]
    new[keep] = labels_flat[keep]

    out = ids.copy()
    out[rows, cols] = new
    labels = np.full((b, k), IGNORE_INDEX, dtype=np.int64)
    labels[rows, slot] = labels_flat
    return out, np.where(used, pos, 0), labels


def check_right_padded(rows: np.ndarray, pad_id: int, sample_index: np.ndarray) -> np.ndarray:
    """(B, T) token rows -> (B, T) bool pad flags, after checking that padding only follows the last
    real token. The pad id inside text would be dropped from attention by the key mask and split a
    varlen segment (roberta_ds/model/attention.py) in two different ways: never silently, it is a data error.
    Our shard builder cannot write it (tokenizers encode a literal "<pad>" as text)."""
    is_pad = rows == pad_id
    inside = is_pad[:, :-1] & ~is_pad[:, 1:]  # a pad followed by a real token
    if inside.any():
        row, col = (int(x[0]) for x in np.nonzero(inside))
        raise ShardFormatError(
            f"sample {int(sample_index[row])} holds the padding id {pad_id} at position {col} inside its "
            "text: the shards contain the pad token. Re-tokenize with roberta-ds' data_tools (special "
            "tokens in text are encoded as text), or drop those documents"
        )
    return is_pad


def unpad_index(is_pad: np.ndarray) -> np.ndarray:
    """(B, T) pad flags -> (N,) int64 flat indices of the positions the unpadded model runs on: real
    tokens and position 0 of every row (`roberta_ds.model.attention.real_tokens`), row-major."""
    keep = ~is_pad
    keep[:, 0] = True
    return np.flatnonzero(keep).astype(np.int64)


class MaskingCollator:
    """Rows (B, T) + their stream indices -> the model's batch dict of torch tensors (see module doc)."""

    def __init__(self, spec: MaskSpec, seed: int, unpad: bool = False) -> None:
        self.spec = spec
        self.seed = seed
        self.unpad = unpad  # also send `unpad_index` (model.unpad); ~3% of a batch's collate time

    def __call__(
        self,
        rows: np.ndarray,
        sample_index: np.ndarray,
        epoch: np.ndarray,
        sentence_starts: np.ndarray | None = None,
    ) -> dict[str, torch.Tensor]:
        is_pad = check_right_padded(rows, self.spec.pad_id, sample_index)
        ids, positions, labels = mask_batch(rows, sample_index, epoch, self.seed, self.spec, sentence_starts)
        batch = {
            "input_ids": torch.from_numpy(ids),
            "mlm_positions": torch.from_numpy(positions),
            "mlm_labels": torch.from_numpy(labels),
            "sample_index": torch.from_numpy(np.ascontiguousarray(sample_index, dtype=np.int64)),
            "num_tokens": torch.tensor(int(is_pad.size - is_pad.sum()), dtype=torch.int64),
        }
        if self.unpad:
            batch["unpad_index"] = torch.from_numpy(unpad_index(is_pad))
        return batch
