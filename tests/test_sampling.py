"""Global order, blend and rank slicing: pure functions of (seed, epoch, sample index)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from roberta_ds.data.sampling import BatchPlan, Blend, hash64, micro_batch_indices, mix64, permute, uniform


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 100, 1023, 4097])
def test_permute_is_a_bijection(n):
    for key in (0, 1, 2**63 + 5):
        p = permute(np.arange(n), n, key)
        assert p.dtype == np.int64 and sorted(p.tolist()) == list(range(n))


def test_permute_depends_on_key_and_is_elementwise():
    n = 1000
    a, b = permute(np.arange(n), n, 7), permute(np.arange(n), n, 8)
    assert (a != b).mean() > 0.9
    # Elementwise: any subset, any order, per-element keys and sizes.
    idx = np.array([999, 3, 500, 3])
    assert permute(idx, n, 7).tolist() == a[idx].tolist()
    mixed = permute(np.array([5, 5]), np.array([10, 1000]), np.array([7, 7]))
    assert mixed[1] == a[5] and 0 <= mixed[0] < 10


def test_permute_looks_uniform():
    # Where element 0 lands, over many keys: roughly uniform over [0, 8).
    pos = np.array([permute(0, 8, k).item() for k in range(4000)])
    counts = np.bincount(pos, minlength=8)
    assert counts.min() > 400 and counts.max() < 600


def test_hash_helpers():
    assert mix64(np.uint64(1)) != mix64(np.uint64(2))
    assert hash64(1, 2) != hash64(2, 1)
    u = uniform(hash64(3, np.arange(100000)))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert hash64(-1, 0) == hash64(np.uint64(2**64 - 1), 0)


def test_single_source_epochs_are_permutations():
    blend = Blend.make([37], [1.0], seed=5)
    assert blend.epoch_size == 37
    src, block, epoch = blend.locate(np.arange(3 * 37))
    assert (src == 0).all() and epoch.tolist() == [e for e in range(3) for _ in range(37)]
    orders = [block[e * 37 : (e + 1) * 37] for e in range(3)]
    for o in orders:
        assert sorted(o.tolist()) == list(range(37))
    assert orders[0].tolist() != orders[1].tolist()
    # Pure: a slice of the stream is the same whether asked alone or with the rest.
    assert blend.locate(np.arange(40, 45))[1].tolist() == block[40:45].tolist()
    # Another seed, another order.
    assert Blend.make([37], [1.0], seed=6).locate(np.arange(37))[1].tolist() != orders[0].tolist()


def test_blend_proportions_and_per_source_epochs():
    blend = Blend.make([100, 100], [3.0, 1.0], seed=1)
    assert blend.counts == (150, 50) and blend.epoch_size == 200
    src, block, _ = blend.locate(np.arange(2 * 200))
    for e in range(2):
        s = src[e * 200 : (e + 1) * 200]
        assert (s == 0).sum() == 150 and (s == 1).sum() == 50
    # The down-weighted source moves on through its data: two epochs see each of its blocks once.
    assert sorted(block[src == 1].tolist()) == list(range(100))
    # The up-weighted one: 300 samples over two epochs = each block exactly 3 times.
    assert np.bincount(block[src == 0], minlength=100).tolist() == [3] * 100
    # Sources are interleaved, not one after the other.
    first = src[:200]
    assert 0.5 < first[:100].mean() * 4 < 1.5


def test_blend_rounding_and_tiny_weights():
    blend = Blend.make([10, 10, 10], [1.0, 1.0, 1e-9], seed=0)
    assert blend.counts == (15, 15, 1)  # every source contributes at least one sample per epoch
    with pytest.raises(ValueError):
        Blend.make([10, 0], [1, 1], seed=0)


def test_micro_batch_indices_layout():
    # Global batch B = 2 * 3 * 2 = 12; step 1 covers 12..23.
    got = {
        (ms, r): micro_batch_indices(BatchPlan.of(2, 3, 2), 1, ms, r).tolist()
        for ms in range(3)
        for r in range(2)
    }
    assert got[(0, 0)] == [12, 13] and got[(0, 1)] == [14, 15] and got[(2, 1)] == [22, 23]
    with pytest.raises(ValueError):
        micro_batch_indices(BatchPlan.of(2, 3, 2), 0, 3, 0)


@pytest.mark.parametrize("global_batch", [4, 8, 12])
def test_global_batch_independent_of_split(global_batch):
    splits = [(m, a, w) for m, a, w in itertools.product([1, 2, 3, 4], repeat=3) if m * a * w == global_batch]
    assert len(splits) >= 3
    for step in range(3):
        unions = []
        for m, a, w in splits:
            parts = [
                micro_batch_indices(BatchPlan.of(m, a, w), step, ms, r)
                for ms in range(a)
                for r in range(w)
            ]
            flat = np.concatenate(parts)
            assert len(set(flat.tolist())) == len(flat)  # no sample twice
            unions.append(sorted(flat.tolist()))
        assert all(u == list(range(step * global_batch, (step + 1) * global_batch)) for u in unions)
