"""Block index: how a shard's sentences are packed into training blocks of at most `max_seq_len` tokens.

A block is a contiguous token range [start, start + length) of ONE shard (blocks never cross shards)
plus the rule that turns it into a row:

    <s> tokens[start : start + length] </s>        with, in FULL-SENTENCES, an extra </s> inserted
                                                    before every document start strictly inside it

Packing is greedy over whole sentences, in shard order (RoBERTa, Liu et al. 2019, section 4.2):

* FULL-SENTENCES (`full-sentences`, the default): sentences are taken contiguously and may cross
  documents; each document boundary inside a block costs one extra </s>. Capacity is
  max_seq_len - 2 tokens, minus those boundary tokens.
* DOC-SENTENCES (`doc-sentences`): the same, but a block never crosses a document (blocks near a
  document's end are short; the collator pads them).

A sentence longer than the capacity C = max_seq_len - 2 is split into C-token pieces (the last one
shorter); pieces pack like sentences, so a C-token piece is a block on its own and the remainder may
share a block with the sentences after it.

Representation: numpy arrays, O(blocks) memory: per block the shard id (int32), the start token
(int64, element offset into the shard's .bin) and the token count (int32); plus, for
FULL-SENTENCES, the within-block offsets of the inserted </s> tokens in CSR form (`doc_starts`;
2 bytes per document), and, for whole-word masking only, the offsets where sentences start
(`sentence_starts`; 2 bytes per sentence). These are computed here, once, rather than looked up
in the shard's index at read time, so that the read path touches no memory map at all: the tokens
are read with `os.pread` (bin_file.py), and a shard truncated while training gives an error that
names the file instead of a SIGBUS.

Building is vectorised over windows of 128K sentences (cumulative sums + one `searchsorted` give,
for every piece, where a block starting there would end); the only Python loop is one step per
block, following those "next" pointers. A 1-billion-token, 50M-sentence corpus packs in seconds
with temporary memory bounded by the window (bench/loader.py measures it). There is no cache file,
so ranks and nodes never race on one: every process builds the same index from the same `.idx`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from roberta_ds.data.shards import ShardReader, idx_path
from roberta_ds.errors import ShardFormatError

WINDOW_SENTENCES = 1 << 17
"""Sentences processed per vectorised step; bounds the temporary memory of packing (~15 MB)."""


@dataclass(frozen=True)
class Offsets:
    """Ragged per-block token offsets (CSR): block b has values[ptr[b] : ptr[b + 1]], increasing, > 0."""

    ptr: np.ndarray  # (n + 1,) int64
    values: np.ndarray  # (total,) uint16 (int32 for blocks over 65,535 tokens)

    def __getitem__(self, b: int) -> np.ndarray:
        return self.values[self.ptr[b] : self.ptr[b + 1]]

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.ptr)

    def gather(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(counts (n,), the values of blocks[0], blocks[1], ... concatenated, as int64)."""
        lo = self.ptr[blocks]
        counts = self.ptr[blocks + 1] - lo
        total = int(counts.sum())
        if total == 0:
            return counts, np.zeros(0, np.int64)
        first = np.cumsum(counts) - counts
        return counts, self.values[np.repeat(lo - first, counts) + np.arange(total)].astype(np.int64)

    @classmethod
    def concat(cls, counts: list[np.ndarray], values: list[np.ndarray], dtype: np.dtype) -> Offsets:
        cnt = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        ptr = np.zeros(len(cnt) + 1, dtype=np.int64)
        np.cumsum(cnt, out=ptr[1:])
        vals = np.concatenate(values).astype(dtype, copy=False) if values else np.zeros(0, dtype)
        return cls(ptr, vals)


@dataclass(frozen=True)
class BlockIndex:
    """Blocks of one shard set, as arrays. Block b is shard `shard[b]`, tokens
    [start[b], start[b] + length[b]); an extra </s> goes before the tokens at offsets
    `doc_starts[b]` (FULL-SENTENCES; none in DOC-SENTENCES). `sentence_starts[b]`, kept only for
    whole-word masking, are the offsets where a sentence begins (its first token starts a word
    even without a leading space)."""

    shard: np.ndarray  # (n,) int32
    start: np.ndarray  # (n,) int64, token (element) offset into the shard's .bin
    length: np.ndarray  # (n,) int32, tokens taken from the shard
    doc_starts: Offsets
    sentence_starts: Offsets | None = None

    def __len__(self) -> int:
        return len(self.shard)

    @property
    def row_lengths(self) -> np.ndarray:
        """(n,) length of each block's row: tokens + inserted </s> + <s> + final </s>."""
        return self.length.astype(np.int64) + self.doc_starts.counts + 2

    @property
    def nbytes(self) -> int:
        arrays = [self.shard, self.start, self.length, self.doc_starts.ptr, self.doc_starts.values]
        if self.sentence_starts is not None:
            arrays += [self.sentence_starts.ptr, self.sentence_starts.values]
        return sum(a.nbytes for a in arrays)


def _boundary_dtype(capacity: int) -> np.dtype:
    return np.dtype(np.uint16) if capacity <= np.iinfo(np.uint16).max else np.dtype(np.int32)


def _check_contiguous(
    lengths: np.ndarray, pointers: np.ndarray, itemsize: int, first: int, path: Path
) -> None:
    """Blocks are byte ranges, so each sentence must start where the previous one ended."""
    if (lengths < 0).any():
        i = int(np.argmax(lengths < 0))
        raise ShardFormatError(f"{path}: sequence {first + i} has negative length {int(lengths[i])}")
    if first == 0 and len(pointers) and pointers[0] != 0:
        raise ShardFormatError(f"{path}: the first sequence pointer is {int(pointers[0])}, expected 0")
    bad = np.nonzero(pointers[1:] != pointers[:-1] + lengths[:-1] * itemsize)[0]
    if bad.size:
        i = first + int(bad[0]) + 1
        raise ShardFormatError(
            f"{path}: sequence {i} does not start where sequence {i - 1} ends (pointers must be "
            "contiguous); check the shard with `roberta-ds verify`"
        )


def _pieces(lengths: np.ndarray, tok0: np.ndarray, capacity: int, skip: int) -> tuple[np.ndarray, ...]:
    """Split sentences longer than the capacity, drop empty ones (they hold no token), and drop the
    first `skip` pieces (already packed). Returns (sentence, piece number, start token, length)."""
    if not ((lengths > capacity).any() or (lengths == 0).any() or skip):
        return np.arange(len(lengths)), np.zeros(len(lengths), np.int64), tok0, lengths
    npieces = -(-lengths // capacity)
    sent = np.repeat(np.arange(len(lengths)), npieces)  # (n,) window-local sentence of each piece
    k = np.arange(len(sent)) - np.repeat(np.cumsum(npieces) - npieces, npieces)  # piece number in sentence
    pstart = np.repeat(tok0, npieces) + k * capacity
    plen = np.minimum(capacity, np.repeat(lengths, npieces) - k * capacity)
    return sent[skip:], k[skip:], pstart[skip:], plen[skip:]


def _document_ids(doc_indices: np.ndarray, s: int, b: int, sent: np.ndarray) -> np.ndarray:
    """Per piece, the number of document-index entries <= its sentence (s + sent): a nondecreasing
    document id that counts repeated entries (empty documents), so it agrees across windows."""
    lo = int(np.searchsorted(doc_indices, s, side="left"))
    hi = int(np.searchsorted(doc_indices, b, side="left"))
    per_sentence = np.bincount(np.asarray(doc_indices[lo:hi], dtype=np.int64) - s, minlength=b - s)
    return (lo + np.cumsum(per_sentence))[sent]


def _block_ends(
    plen: np.ndarray, doc: np.ndarray, is_start: np.ndarray, capacity: int, cross: bool
) -> np.ndarray:
    """nxt[i]: one past the last piece of the greedy (longest fitting) block starting at piece i.

    FULL-SENTENCES: cost(i..j) = cum[j] - cum[i] - is_start[i] with cum the running sum of
    length + is_start (each document start after i costs one </s>). DOC-SENTENCES: plain lengths,
    cut at the end of piece i's document.
    """
    cost = plen + is_start if cross else plen
    cum = np.zeros(len(plen) + 1, dtype=np.int64)
    np.cumsum(cost, out=cum[1:])
    nxt = np.searchsorted(cum, cum[:-1] + capacity + (is_start if cross else 0), side="right") - 1
    if not cross:
        np.minimum(nxt, np.searchsorted(doc, doc, side="right"), out=nxt)
    return nxt


def _chase(nxt: np.ndarray, last: bool) -> tuple[list[int], int]:
    """Block heads from piece 0 on, one step per block; stops before a block that may end beyond
    the window (unless it is the shard's last). Returns (heads, first unresolved piece)."""
    n, step = len(nxt), nxt.item  # .item(i): a Python int straight from the array, no conversion of it all
    heads: list[int] = []
    i = 0
    while i < n:
        j = step(i)
        if j >= n and not last:
            break
        heads.append(i)
        i = j
    return heads, i


def _inner(flag: np.ndarray, heads: np.ndarray, pstart: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts per block and block-relative offsets of the flagged resolved pieces that start no block.
    flag/pstart: (i,) over the resolved pieces; heads: (blocks,) increasing piece indices."""
    at = np.flatnonzero(flag)
    bid = np.searchsorted(heads, at, side="right") - 1
    inner = heads[bid] != at
    at, bid = at[inner], bid[inner]
    return np.bincount(bid, minlength=len(heads)), pstart[at] - pstart[heads[bid]]


def pack_shard(
    reader: ShardReader,
    capacity: int,
    cross_documents: bool,
    *,
    sentence_starts: bool = False,
    window: int = WINDOW_SENTENCES,
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """Greedy packing of one shard: (start, length, document starts, sentence starts) per block.

    `capacity` = max_seq_len - 2. `cross_documents` selects FULL-SENTENCES (True) or
    DOC-SENTENCES (False). Starts are (counts per block, offsets within blocks); sentence starts
    only when asked for (else None). See the module docstring for the rules.
    """
    if capacity < 1:
        raise ShardFormatError(f"block capacity must be >= 1 token, got {capacity}")
    path = idx_path(reader.prefix)
    lengths_all, pointers_all, doc_all = (
        reader.sequence_lengths,
        reader.sequence_pointers,
        reader.document_indices,
    )
    itemsize = reader.dtype.itemsize
    n_seq = len(lengths_all)
    out_start: list[np.ndarray] = []
    out_len: list[np.ndarray] = []
    out_doc: list[tuple[np.ndarray, np.ndarray]] = []
    out_sent: list[tuple[np.ndarray, np.ndarray]] = []
    s, skip, prev_doc, w = 0, 0, -1, window  # next sentence, its pieces already packed, doc before it
    while s < n_seq:
        b = min(n_seq, s + w)
        a = max(s - 1, 0)  # one sentence of overlap so contiguity is checked across windows too
        lengths = np.asarray(lengths_all[a:b], dtype=np.int64)
        pointers = np.asarray(pointers_all[a:b], dtype=np.int64)
        _check_contiguous(lengths, pointers, itemsize, a, path)
        sent, k, pstart, plen = _pieces(lengths[s - a :], pointers[s - a :] // itemsize, capacity, skip)
        doc = _document_ids(doc_all, s, b, sent)
        is_start = np.empty(len(sent), dtype=bool)  # first piece of a document
        if len(sent):
            is_start[0] = doc[0] != prev_doc
            np.not_equal(doc[1:], doc[:-1], out=is_start[1:])
        nxt = _block_ends(plen, doc, is_start, capacity, cross_documents)
        heads, i = _chase(nxt, last=b == n_seq)
        if not heads and b < n_seq:
            w *= 2  # every piece of this window belongs to one unfinished block: look further
            continue

        h = np.asarray(heads, dtype=np.int64)
        out_start.append(pstart[h])
        out_len.append(pstart[nxt[h] - 1] + plen[nxt[h] - 1] - pstart[h])
        out_doc.append(_inner(is_start[:i] if cross_documents else np.zeros(i, bool), h, pstart))
        if sentence_starts:
            out_sent.append(_inner(k[:i] == 0, h, pstart))
        if i < len(sent):  # resume at the first unresolved piece
            s, skip, prev_doc = s + int(sent[i]), int(k[i]), int(doc[i - 1])
        else:
            s, skip, prev_doc = b, 0, (int(doc[-1]) if len(sent) else prev_doc)

    bdt = _boundary_dtype(capacity)

    def cat(parts: list[np.ndarray], dt: np.dtype) -> np.ndarray:
        return np.concatenate(parts).astype(dt, copy=False) if parts else np.zeros(0, dt)

    def ragged(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        return cat([c for c, _ in parts], np.int64), cat([v for _, v in parts], bdt)

    return (
        cat(out_start, np.int64),
        cat(out_len, np.int32),
        ragged(out_doc),
        (ragged(out_sent) if sentence_starts else None),
    )


def build_block_index(
    readers: list[ShardReader], max_seq_len: int, packing: str, *, sentence_starts: bool = False
) -> BlockIndex:
    """Pack every shard of a set (`packing` is `full-sentences` or `doc-sentences`)."""
    if packing not in ("full-sentences", "doc-sentences"):
        raise ValueError(f"unknown packing {packing!r}")
    capacity = max_seq_len - 2
    bdt = _boundary_dtype(capacity)
    shards, starts, lens, docs, sents = [], [], [], [], []
    for sid, reader in enumerate(readers):
        st, ln, doc, sent = pack_shard(
            reader, capacity, packing == "full-sentences", sentence_starts=sentence_starts
        )
        shards.append(np.full(len(st), sid, dtype=np.int32))
        starts.append(st)
        lens.append(ln)
        docs.append(doc)
        sents.append(sent)
    return BlockIndex(
        shard=np.concatenate(shards) if shards else np.zeros(0, np.int32),
        start=np.concatenate(starts) if starts else np.zeros(0, np.int64),
        length=np.concatenate(lens) if lens else np.zeros(0, np.int32),
        doc_starts=Offsets.concat([c for c, _ in docs], [v for _, v in docs], bdt),
        sentence_starts=Offsets.concat([c for c, _ in sents], [v for _, v in sents], bdt)
        if sentence_starts
        else None,
    )
