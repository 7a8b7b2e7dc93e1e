"""Reading blocks from shards: `os.pread` on per-process descriptors, rows assembled for the batch.

A `Source` is one opened shard set: its manifest, a `ShardFile` per shard and its `BlockIndex`
(blocks.py). `read_rows` turns (source, block) pairs into the rows the collator masks.

Why not the memory map: tokens are read with `os.pread` on a descriptor each process opens itself
(lazily, after unpickling or fork), and every read's byte count is checked; once per batch each
shard the batch touches is `stat`-ed and compared with the descriptor (device, inode, size, link
count). So a shard deleted, replaced or truncated while training raises ShardFormatError naming
the file -- never a SIGBUS from a truncated mmap, never stale bytes of an unlinked file. The
shard's `.idx` is only read while the index is built (blocks.py); nothing maps it afterwards.
Everything pickles as paths + identities + arrays, so DataLoader workers reopen on their own.
"""

from __future__ import annotations

import os
import stat
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from roberta_ds.config import DataConfig
from roberta_ds.data.blocks import BlockIndex, Offsets, build_block_index
from roberta_ds.data.shards import Manifest, bin_path, open_shards
from roberta_ds.errors import ShardFormatError

MAX_OPEN_SHARDS = 256
"""Descriptors a process keeps open at once (least recently used closed first): a 1T-token corpus
has thousands of shards, more than the usual `ulimit -n` of 1024."""
_open: OrderedDict[int, ShardFile] = OrderedDict()  # this process's open shards, least recent first
_open_pid = os.getpid()


def _track(f: ShardFile) -> None:
    """Mark `f` most recently used; close the least recently used beyond MAX_OPEN_SHARDS."""
    global _open_pid
    if _open_pid != os.getpid():  # a forked child: the parent's table is not ours
        _open.clear()
        _open_pid = os.getpid()
    _open[id(f)] = f
    _open.move_to_end(id(f))
    while len(_open) > MAX_OPEN_SHARDS:
        _open.popitem(last=False)[1].close()


class ShardFile:
    """One shard's `.bin`, read with `os.pread`; pickles as (path, dtype, identity) and reopens lazily.

    Reopening (after fork, unpickling or an LRU close) checks the file is still the one the index
    was built from, so closing a descriptor never lets a replaced file in.
    """

    def __init__(self, path: Path, dtype: np.dtype, identity: tuple[int, int, int]) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.identity = identity  # (st_dev, st_ino, st_size) of the file the index was built from
        self._fd: int | None = None
        self._pid = -1

    @classmethod
    def open(cls, path: Path, dtype: np.dtype, expected_size: int) -> ShardFile:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ShardFormatError(f"{path}: file not found") from None
        if st.st_size != expected_size:
            raise ShardFormatError(f"{path}: {st.st_size} bytes, its index describes {expected_size}")
        return cls(path, dtype, (st.st_dev, st.st_ino, st.st_size))

    def _gone(self, why: str) -> ShardFormatError:
        return ShardFormatError(
            f"{self.path}: {why} while the data pipeline had it open; shards must not change during a run "
            "(restore the file, or restart so the index is rebuilt)"
        )

    def fd(self) -> int:
        pid = os.getpid()
        if self._fd is not None and self._pid == pid:
            _track(self)
            return self._fd
        if self._fd is not None:  # inherited through fork: close the child's copy, open our own
            os.close(self._fd)
            self._fd = None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise self._gone("deleted") from None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, st.st_size) != self.identity:
            os.close(fd)
            if (st.st_dev, st.st_ino) != self.identity[:2]:
                raise self._gone("replaced by another file")
            raise self._gone(f"truncated or resized ({st.st_size} bytes, was {self.identity[2]})")
        self._fd, self._pid = fd, pid
        _track(self)
        return fd

    def check(self) -> None:
        """Is the path still the file we read, with its size? (called once per batch)"""
        fd = self.fd()
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise self._gone("deleted or renamed") from None
        fst = os.fstat(fd)
        if fst.st_nlink == 0 or not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != self.identity[:2]:
            raise self._gone("deleted or replaced")
        if st.st_size != self.identity[2] or fst.st_size != self.identity[2]:
            raise self._gone(f"truncated or resized ({fst.st_size} bytes, was {self.identity[2]})")

    def read(self, start: int, count: int, fd: int | None = None) -> np.ndarray:
        """Tokens [start, start + count) as a (count,) array of the shard's dtype; `fd`: this file's
        descriptor from `fd()` when the caller already holds it (read_rows, once per batch)."""
        nbytes, offset = count * self.dtype.itemsize, start * self.dtype.itemsize
        data = os.pread(self.fd() if fd is None else fd, nbytes, offset)
        if len(data) != nbytes:
            raise self._gone(f"truncated (read {len(data)} of {nbytes} bytes at offset {offset})")
        return np.frombuffer(data, dtype=self.dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "dtype": self.dtype.str, "identity": self.identity}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(Path(state["path"]), np.dtype(state["dtype"]), tuple(state["identity"]))

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
            _open.pop(id(self), None)
        self._fd = None

    def __del__(self) -> None:
        self.close()


@dataclass
class Source:
    """One opened shard set: its manifest, its shards' .bin files and its blocks."""

    path: str
    manifest: Manifest
    files: list[ShardFile]
    blocks: BlockIndex


def open_source(path: str, cfg: DataConfig) -> Source:
    """Open a shard set and pack its blocks (keeping sentence starts for whole-word masking)."""
    manifest, readers = open_shards(path)
    files = []
    for r in readers:
        size = int(r.sequence_pointers[-1]) + int(r.sequence_lengths[-1]) * r.dtype.itemsize if len(r) else 0
        files.append(ShardFile.open(bin_path(r.prefix), r.dtype, size))
    blocks = build_block_index(readers, cfg.max_seq_len, cfg.packing, sentence_starts=cfg.whole_word_mask)
    del readers  # the index is built; nothing maps the shards any more
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
    # Descriptors looked up once per shard, not per row, while they all stay open (the LRU keeps
    # MAX_OPEN_SHARDS; a batch over more shards than that looks each one up as it reads).
    fds = {f: f.fd() for f in touched} if len(touched) <= MAX_OPEN_SHARDS else {}
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
