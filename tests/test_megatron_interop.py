"""Byte compatibility with megatron-core's IndexedDataset, both ways (megatron-core from PyPI).

megatron-core is in the test extra, so CI runs these; they skip only where it is not installed.
It is imported lazily: importing megatron.core takes several seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from roberta_ds.data.shard_set import open_shards, verify_shard
from roberta_ds.data.shards import ShardReader, ShardWriter, bin_path, idx_path


@pytest.fixture(scope="module")
def megatron():
    return pytest.importorskip("megatron.core.datasets.indexed_dataset")


def test_megatron_reads_our_shards(megatron, small_shards):
    _, readers = open_shards(small_shards / "train")
    for ours in readers[:2]:
        theirs = megatron.IndexedDataset(str(ours.prefix))
        assert len(theirs) == len(ours)
        assert np.array_equal(theirs.document_indices, ours.document_indices)
        assert np.array_equal(theirs.sequence_lengths, ours.sequence_lengths)
        assert theirs.index.dtype == np.uint16
        for i in range(0, len(ours), 97):
            assert np.array_equal(theirs[i], ours[i])
        assert np.array_equal(theirs[len(ours) - 1], ours[len(ours) - 1])
        # A document read Megatron's way (get with offset/length over a sequence range).
        lo, hi = int(ours.document_indices[3]), int(ours.document_indices[4])
        doc = np.concatenate([theirs[i] for i in range(lo, hi)])
        assert np.array_equal(doc, np.concatenate(ours.document(3)))


def _random_docs(seed: int, high: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        [rng.integers(0, high, int(rng.integers(1, 40))) for _ in range(int(rng.integers(1, 8)))]
        for _ in range(60)
    ]


@pytest.mark.parametrize("dtype,high", [(np.uint16, 65536), (np.int32, 2**31 - 1)])
def test_megatron_reads_our_int32_and_uint16(megatron, tmp_path, dtype, high):
    docs = _random_docs(1, high)
    with ShardWriter(tmp_path / "ours", dtype) as w:
        for d in docs:
            for s in d:
                w.add_sequence(s)
            w.end_document()
    theirs = megatron.IndexedDataset(str(tmp_path / "ours"))
    flat = [s for d in docs for s in d]
    assert len(theirs) == len(flat)
    assert all(np.array_equal(theirs[i], s) for i, s in enumerate(flat))
    assert theirs.document_indices.tolist() == [0, *np.cumsum([len(d) for d in docs]).tolist()]


@pytest.mark.parametrize("dtype,high", [(np.uint16, 65536), (np.int32, 2**31 - 1)])
def test_we_read_megatron_builder_output(megatron, tmp_path, dtype, high):
    import torch

    docs = _random_docs(2, high)
    prefix = str(tmp_path / "theirs")
    builder = megatron.IndexedDatasetBuilder(bin_path(prefix), dtype=dtype)
    for k, d in enumerate(docs):
        if k % 2:  # both of Megatron's ways to add a document
            builder.add_document(np.concatenate(d), [len(s) for s in d])
        else:
            for s in d:
                builder.add_item(torch.from_numpy(s.astype(np.int64)))
            builder.end_document()
    builder.finalize(str(idx_path(prefix)))
    ours = ShardReader(prefix)
    assert ours.dtype == np.dtype(dtype)
    flat = [s for d in docs for s in d]
    assert [s.tolist() for s in ours] == [s.tolist() for s in flat]
    assert ours.num_documents == len(docs)
    verify_shard(prefix, vocab_size=high)
    # Same content through our writer gives the very same bytes.
    with ShardWriter(tmp_path / "ours", dtype) as w:
        for d in docs:
            for s in d:
                w.add_sequence(s)
            w.end_document()
    for p in (idx_path, bin_path):
        assert p(tmp_path / "ours").read_bytes() == p(prefix).read_bytes()
