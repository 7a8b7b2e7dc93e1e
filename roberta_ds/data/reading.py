"""Reading blocks from shards: `os.pread` on per-process descriptors, rows assembled for the batch.

A `Source` is one opened shard set: its manifest, a `ShardFile` per shard (bin_file.py, the one
`.bin` reader) and its `BlockIndex` (blocks.py). `read_rows` turns (source, block) pairs into the
rows the collator masks.

Tokens are read with `os.pread`, never a memory map, and once per batch each shard the batch touches
is checked against the file it was opened as (`ShardFile.check`): a shard deleted, replaced or
truncated while training raises ShardFormatError naming the file. The shard's `.idx` is only read
while the index is built (blocks.py); nothing maps it afterwards. The open descriptors are bounded
by a `DescriptorCache` the caller passes in (one per training run or validation set). Everything
pickles as paths + identities + arrays, so DataLoader workers reopen on their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from roberta_ds.config import DataConfig
from roberta_ds.data.bin_file import DescriptorCache, ShardFile
from roberta_ds.data.blocks import BlockIndex, Offsets, build_block_index
from roberta_ds.data.shard_set import Manifest, open_shards
from roberta_ds.errors import ShardFormatError


@dataclass
class Source:
    """One opened shard set: its manifest, its shards' .bin files and its blocks."""

    path: str
    manifest: Manifest
    files: list[ShardFile]
    blocks: BlockIndex


def open_source(path: str, cfg: DataConfig, descriptors: DescriptorCache) -> Source:
    """Open a shard set and pack its blocks (keeping sentence starts for whole-word masking); its
    `.bin` files keep their descriptors in `descriptors`."""
    manifest, readers = open_shards(path, descriptors)
    files = [r.bin for r in readers]
    blocks = build_block_index(readers, cfg.max_seq_len, cfg.packing, sentence_starts=cfg.whole_word_mask)
    del readers  # the index is built; nothing maps the `.idx` files any more
    if len(blocks) == 0:
        raise ShardFormatError(f"{path}: the shard set holds no tokens")
    return Source(str(path), manifest, files, blocks)


def _gather(
    sources: list[Source], src: np.ndarray, block: np.ndarray, which: Callable[[BlockIndex], Offsets]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ragged block offsets of each row: (counts (B,), row of each value, value), in row order."""
    if len(sources) == 1:
        counts, values = which(sources[0].blocks).gather(block)
        return counts, np.repeat(np.arange(len(block)), counts), values
    counts = np.zeros(len(src), np.int64)
    rows_parts, values_parts = [], []
    for s in np.unique(src).tolist():
        rows = np.flatnonzero(src == s)
        c, v = which(sources[s].blocks).gather(block[rows])
        counts[rows] = c
        rows_parts.append(np.repeat(rows, c))
        values_parts.append(v)
    rows, values = np.concatenate(rows_parts), np.concatenate(values_parts)
    if len(rows_parts) > 1:
        order = np.argsort(rows, kind="stable")
        rows, values = rows[order], values[order]
    return counts, rows, values


def read_rows(
    sources: list[Source], src: np.ndarray, block: np.ndarray, seq_len: int, special_ids: dict[str, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows of the given blocks: (B, seq_len) int64 `<s> tokens (</s> before each document start
    inside) </s> <pad>...`, and (B, seq_len) bool marking where sentences start (None unless the
    blocks keep sentence starts, i.e. for whole-word masking).

    One `pread` per row; everything else is vectorised over the batch.
    """
    b = len(src)
    if b == 0:
        return np.zeros((0, seq_len), np.int64), None
    if len(sources) == 1:  # the common case: no grouping by source
        idx = sources[0].blocks
        shard, start, length = idx.shard[block], idx.start[block], idx.length[block].astype(np.int64)
    else:
        shard, start, length = (np.empty(b, np.int64) for _ in range(3))
        for s in np.unique(src).tolist():
            rows = np.flatnonzero(src == s)
            idx, blk = sources[s].blocks, block[rows]
            shard[rows], start[rows], length[rows] = idx.shard[blk], idx.start[blk], idx.length[blk]
    files = [sources[s].files[h] for s, h in zip(src.tolist(), shard.tolist())]
    touched = set(files)
    for f in touched:
        f.check()  # once per batch per shard touched: deleted, replaced or truncated -> named error
    # Descriptors looked up once per shard, not per row, while they all stay open (a DescriptorCache
    # keeps max_open; a batch over more shards than that looks each one up as it reads).
    fds = {f: f.fd() for f in touched} if len(touched) <= min(f.max_open for f in touched) else {}
    parts = [f.read(st, n, fds.get(f)) for f, st, n in zip(files, start.tolist(), length.tolist())]
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.int64)  # (N,) all rows' tokens

    # Flat destination of each token in `out`: row start + 1 (after <s>) + its offset + the </s>
    # inserted at or before it.
    first = np.cumsum(length) - length  # (B,) where each row's tokens begin in `tokens`
    dest = np.arange(len(tokens)) + np.repeat(np.arange(b) * seq_len + 1 - first, length)
    doc_count, doc_row, doc_off = _gather(sources, src, block, lambda i: i.doc_starts)
    if len(doc_off):
        at = first[doc_row] + doc_off  # (D,) index in `tokens` of each document's first token
        bump = np.bincount(at, minlength=len(tokens))
        inserted = np.cumsum(bump)
        dest += inserted - np.repeat(inserted[first] - bump[first], length)
    out = np.full((b, seq_len), special_ids["pad"], dtype=np.int64)
    flat = out.reshape(-1)
    flat[dest] = tokens
    out[:, 0] = special_ids["bos"]
    out[np.arange(b), 1 + length + doc_count] = special_ids["eos"]
    if len(doc_off):
        flat[dest[at] - 1] = special_ids["eos"]

    if not all(sources[s].blocks.sentence_starts is not None for s in np.unique(src).tolist()):
        return out, None
    sentence_starts = np.zeros(out.shape, dtype=bool)
    _, sent_row, sent_off = _gather(sources, src, block, lambda i: i.sentence_starts)
    sentence_starts.reshape(-1)[dest[first[sent_row] + sent_off]] = True
    return out, sentence_starts
