"""Dynamic masking: statistics, specials, determinism per (seed, epoch, sample), whole words, shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from roberta_ds.config import DataConfig
from roberta_ds.data.masking import IGNORE_INDEX, MaskingCollator, MaskSpec, mask_batch, mask_slots
from roberta_ds.errors import ConfigError

V = 30000
SPECIALS = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}


def spec_for(cfg: DataConfig, word_starts=None) -> MaskSpec:
    return MaskSpec.make(cfg, V, SPECIALS, word_starts)


def random_rows(seed, b, t, min_len=8):
    """Right-padded rows <s> ... </s> <pad>... with random ordinary ids and an inner </s>."""
    rng = np.random.default_rng(seed)
    rows = np.full((b, t), SPECIALS["pad"], dtype=np.int64)
    for r in range(b):
        n = int(rng.integers(min_len, t + 1))
        rows[r, :n] = rng.integers(5, V, size=n)
        rows[r, 0], rows[r, n - 1], rows[r, n // 2] = 0, 2, 2
    return rows


def test_mask_slots():
    assert mask_slots(DataConfig()) == math.ceil(0.15 * 510) + 1 == 78
    assert mask_slots(DataConfig(whole_word_mask=True)) == 78 + 16
    assert mask_slots(DataConfig(max_seq_len=8, mask_prob=0.9, whole_word_mask=True)) == 8


def test_statistics_80_10_10():
    cfg = DataConfig()
    spec = spec_for(cfg)
    rows = random_rows(0, 200, 512, min_len=512)  # 102,400 tokens
    ids, pos, labels = mask_batch(rows, np.arange(200), np.zeros(200, np.int64), 1, spec)
    used = labels != IGNORE_INDEX
    maskable = ~spec.special[rows]
    assert abs(used.sum() / maskable.sum() - 0.15) < 0.01
    got = np.take_along_axis(ids, pos, axis=1)[used]
    orig = labels[used]
    frac_mask = (got == SPECIALS["mask"]).mean()
    frac_kept = (got == orig).mean()
    frac_random = ((got != orig) & (got != SPECIALS["mask"])).mean()
    assert abs(frac_mask - 0.8) < 0.01 and abs(frac_kept - 0.1) < 0.01 and abs(frac_random - 0.1) < 0.01
    # Only chosen positions change.
    changed = ids != rows
    chosen = np.zeros_like(changed)
    np.put_along_axis(chosen, pos, used, axis=1)
    assert not (changed & ~chosen).any()
    # Per row count is exact: floor(0.15 * n + u) is floor or ceil of 0.15 * n.
    n = maskable.sum(1)
    assert ((used.sum(1) == np.floor(0.15 * n)) | (used.sum(1) == np.ceil(0.15 * n))).all()


def test_specials_and_pads_never_masked():
    spec = spec_for(DataConfig(max_seq_len=64, mask_prob=0.6))
    rows = random_rows(1, 300, 64)
    rows[:, 5] = SPECIALS["unk"]
    ids, pos, labels = mask_batch(rows, np.arange(300), np.zeros(300, np.int64), 3, spec)
    used = labels != IGNORE_INDEX
    special = spec.special[rows]
    assert not np.take_along_axis(special, pos, axis=1)[used].any()
    assert (ids[special] == rows[special]).all()  # specials and pads unchanged
    assert not spec.special[ids[~special & (ids != SPECIALS["mask"])]].any()  # random ids never special
    # Unused slots point at position 0 with label -100; used positions strictly increase.
    assert (pos[~used] == 0).all()
    for r in range(300):
        p = pos[r, used[r]]
        assert (np.diff(p) > 0).all()


def test_same_mask_for_same_sample_whatever_the_batch():
    spec = spec_for(DataConfig(max_seq_len=128))
    rows = random_rows(2, 16, 128)
    index = np.arange(1000, 1016)
    epoch = np.full(16, 3)
    whole = mask_batch(rows, index, epoch, 9, spec)
    for r in (0, 7, 15):  # alone, or in another batch order
        alone = mask_batch(rows[r : r + 1], index[r : r + 1], epoch[r : r + 1], 9, spec)
        for a, w in zip(alone, whole):
            assert (a[0] == w[r]).all()
    perm = np.random.default_rng(0).permutation(16)
    shuffled = mask_batch(rows[perm], index[perm], epoch[perm], 9, spec)
    for a, w in zip(shuffled, whole):
        assert (a == w[perm]).all()


def test_different_mask_next_epoch_and_other_seed():
    spec = spec_for(DataConfig(max_seq_len=128))
    rows = random_rows(3, 16, 128)
    idx = np.arange(16)
    e0 = mask_batch(rows, idx, np.zeros(16, np.int64), 1, spec)[1]
    e1 = mask_batch(rows, idx, np.ones(16, np.int64), 1, spec)[1]
    s2 = mask_batch(rows, idx, np.zeros(16, np.int64), 2, spec)[1]
    assert (e0 != e1).any(axis=1).all() and (e0 != s2).any(axis=1).all()
    assert (mask_batch(rows, idx, np.zeros(16, np.int64), 1, spec)[1] == e0).all()


def test_whole_word_masking():
    cfg = DataConfig(max_seq_len=128, whole_word_mask=True)
    with pytest.raises(ConfigError, match="word_starts"):
        spec_for(cfg)
    rng = np.random.default_rng(4)
    table = rng.random(V) < 0.3  # hand-made word-start table
    spec = spec_for(cfg, table)
    rows = random_rows(5, 64, 128, min_len=100)
    ids, pos, labels = mask_batch(rows, np.arange(64), np.zeros(64, np.int64), 1, spec)
    used = labels != IGNORE_INDEX
    counts = used.sum(1)
    assert (counts <= spec.slots).all()
    maskable = ~spec.special[rows]
    n = maskable.sum(1)
    assert (counts >= np.floor(0.15 * n)).all()  # words are added until the count is reached
    assert abs(counts.sum() / n.sum() - 0.15) < 0.03
    for r in range(64):
        chosen = np.zeros(128, bool)
        chosen[pos[r, used[r]]] = True
        # Word id per token: a new word at a table start or after a non-maskable token.
        starts = maskable[r] & (table[rows[r]] | np.r_[True, ~maskable[r, :-1]])
        wid = np.cumsum(starts)
        for w in np.unique(wid[maskable[r]]):
            member = maskable[r] & (wid == w)
            assert chosen[member].all() or not chosen[member].any()  # all of a word or none
    with pytest.raises(ConfigError, match="shape"):
        spec_for(cfg, table[:10])


def test_collator_contract():
    cfg = DataConfig(max_seq_len=64)
    collate = MaskingCollator(spec_for(cfg), seed=1, unpad=True)
    rows = random_rows(6, 4, 64)
    batch = collate(rows, np.arange(4), np.zeros(4, np.int64))
    k = mask_slots(cfg)
    assert {n: tuple(t.shape) for n, t in batch.items()} == {
        "input_ids": (4, 64),
        "mlm_positions": (4, k),
        "mlm_labels": (4, k),
        "sample_index": (4,),
        "num_tokens": (),
        "unpad_index": (int(batch["num_tokens"]),),  # rows start with a real token: no forced position 0
    }
    assert all(str(t.dtype) == "torch.int64" for t in batch.values())
    assert int(batch["num_tokens"]) == int((rows != SPECIALS["pad"]).sum())
    assert torch.equal(batch["unpad_index"], torch.from_numpy(np.flatnonzero(rows != SPECIALS["pad"])))
    plain = MaskingCollator(spec_for(cfg), seed=1)(rows, np.arange(4), np.zeros(4, np.int64))
    assert set(batch) - set(plain) == {"unpad_index"}  # only when the model runs unpadded
