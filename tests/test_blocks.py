"""Block packing: the vectorised packer against a plain per-sentence reference, plus the invariants
(every token once, no row over max_seq_len, </s> exactly at document starts, DOC-SENTENCES never
crosses a document), on shards with long sentences, empty sentences and empty documents."""

from __future__ import annotations

import bisect

import numpy as np
import pytest
from synthetic_shards import random_corpus

from roberta_ds.data.blocks import BlockIndex, build_block_index, pack_shard
from roberta_ds.data.shards import ShardReader, bin_path, encode_index, idx_path
from roberta_ds.errors import ShardFormatError


def write_raw_shard(prefix, lengths, doc_indices) -> ShardReader:
    """A shard straight from lengths/document indices (allows empty sentences and documents)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    idx_path(prefix).write_bytes(encode_index(lengths, np.asarray(doc_indices), np.dtype(np.uint16)))
    bin_path(prefix).write_bytes(np.arange(int(lengths.sum()), dtype="<u2").tobytes())
    return ShardReader(prefix)


def reference_pack(lengths, doc_indices, capacity, full):
    """Greedy packing, one sentence piece at a time:
    [(start, length, [document-start offsets], [sentence-start offsets])]."""
    pieces, tok = [], 0
    for s, n in enumerate(lengths):
        doc = bisect.bisect_right(list(doc_indices), s)
        for k in range(-(-n // capacity)):
            pieces.append((tok + k * capacity, min(capacity, n - k * capacity), doc, k == 0))
        tok += n
    blocks, cur = [], None
    for start, n, doc, first in pieces:
        if cur is not None:
            extra = int(full and doc != cur["doc"])
            if cur["cost"] + extra + n <= capacity and (full or doc == cur["doc"]):
                if extra:
                    cur["docs"].append(start - cur["start"])
                if first:
                    cur["sents"].append(start - cur["start"])
                cur.update(cost=cur["cost"] + extra + n, end=start + n, doc=doc)
                continue
            blocks.append((cur["start"], cur["end"] - cur["start"], cur["docs"], cur["sents"]))
        cur = dict(start=start, end=start + n, cost=n, doc=doc, docs=[], sents=[])
    if cur is not None:
        blocks.append((cur["start"], cur["end"] - cur["start"], cur["docs"], cur["sents"]))
    return blocks


def ragged_lists(counts, values):
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    return [values[ptr[i] : ptr[i + 1]].tolist() for i in range(len(counts))]


def as_list(start, length, docs, sents):
    d, s = ragged_lists(*docs), ragged_lists(*sents)
    return [(int(a), int(n), d[i], s[i]) for i, (a, n) in enumerate(zip(start, length))]


def random_shard_spec(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    lengths = rng.integers(0, 25, size=n)  # zero-length sentences included
    lengths[rng.random(n) < 0.05] = rng.integers(30, 90)  # some longer than the capacity
    cuts = np.sort(rng.choice(np.arange(1, n + 1), size=min(n, int(rng.integers(0, 40))), replace=True))
    doc_indices = np.concatenate([[0], cuts, [n]])  # repeated cuts = empty documents
    if lengths.sum() == 0:
        lengths[0] = 1
    return lengths, doc_indices


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("window", [1, 3, 17, 1 << 20])
def test_matches_reference(tmp_path, full, window):
    for seed in range(12):
        lengths, doc_indices = random_shard_spec(seed)
        reader = write_raw_shard(tmp_path / f"s{seed}", lengths, doc_indices)
        for capacity in (1, 7, 30):
            got = as_list(*pack_shard(reader, capacity, full, sentence_starts=True, window=window))
            want = reference_pack(lengths.tolist(), doc_indices.tolist(), capacity, full)
            assert got == want, (seed, capacity)


def check_invariants(index: BlockIndex, readers, max_seq_len, full):
    assert (index.row_lengths <= max_seq_len).all()
    assert (index.length >= 1).all()
    for sid, r in enumerate(readers):
        mine = np.flatnonzero(index.shard == sid)
        starts, ends = index.start[mine], index.start[mine] + index.length[mine]
        # Blocks tile the shard's tokens: each token in exactly one block, in order.
        assert starts[0] == 0 and ends[-1] == r.num_tokens and (starts[1:] == ends[:-1]).all()
        offsets = r.token_offsets()
        doc_starts = set(offsets[r.document_indices[:-1]].tolist())
        sentence_starts = set(offsets.tolist())
        for b, s, e in zip(mine.tolist(), starts.tolist(), ends.tolist()):
            inside = {t - s for t in doc_starts if s < t < e}
            if full:
                assert set(index.doc_starts[b].tolist()) == inside
            else:
                assert not inside and len(index.doc_starts[b]) == 0
            assert set(index.sentence_starts[b].tolist()) == {t - s for t in sentence_starts if s < t < e}
            # A block starts at a sentence start or inside a sentence longer than the capacity.
            sent = int(np.searchsorted(offsets, s, side="right")) - 1
            assert s in sentence_starts or r.sequence_lengths[sent] > max_seq_len - 2


@pytest.mark.parametrize("packing", ["full-sentences", "doc-sentences"])
def test_invariants_real_writer(tmp_path, packing):
    from synthetic_shards import write_set

    write_set(tmp_path, random_corpus(3, shards=3, docs=15, long_every=23, long_len=70))
    readers = [ShardReader(tmp_path / f"shard-{i:03d}") for i in range(3)]
    index = build_block_index(readers, 32, packing, sentence_starts=True)
    check_invariants(index, readers, 32, packing == "full-sentences")
    assert set(index.shard.tolist()) == {0, 1, 2}


def test_full_sentences_row_layout(tmp_path):
    # Two documents of 3 + 2 tokens fit one block: <s> a a a </s> b b </s>.
    reader = write_raw_shard(tmp_path / "s", [3, 2], [0, 1, 2])
    start, length, (counts, offsets), sents = pack_shard(reader, 30, True)
    assert start.tolist() == [0] and length.tolist() == [5] and offsets.tolist() == [3] and sents is None
    start, length, (counts, offsets), _ = pack_shard(reader, 30, False)  # DOC-SENTENCES: two blocks
    assert start.tolist() == [0, 3] and length.tolist() == [3, 2] and counts.tolist() == [0, 0]
    # The boundary </s> costs capacity: 3 + 1 + 2 = 6 > 5, so two blocks.
    start, length, _, _ = pack_shard(reader, 5, True)
    assert start.tolist() == [0, 3]


def test_long_sentence_split_and_remainder_shares(tmp_path):
    reader = write_raw_shard(tmp_path / "s", [25, 3], [0, 2])
    start, length, _, _ = pack_shard(reader, 10, True)
    # 25 tokens -> pieces 10, 10, 5; the 5-token remainder shares a block with the next sentence.
    assert start.tolist() == [0, 10, 20] and length.tolist() == [10, 10, 8]


def test_non_contiguous_pointers_refused(tmp_path):
    prefix = tmp_path / "bad"
    data = bytearray(encode_index(np.array([2, 2]), np.array([0, 2]), np.dtype(np.uint16)))
    # Second pointer 4 -> 6 bytes (a gap), and a .bin sized to match it.
    data[34 + 8 + 8 : 34 + 8 + 16] = np.array([6], "<i8").tobytes()
    idx_path(prefix).write_bytes(bytes(data))
    bin_path(prefix).write_bytes(b"\0" * 10)
    with pytest.raises(ShardFormatError, match=r"bad\.idx.*contiguous"):
        pack_shard(ShardReader(prefix), 10, True)
