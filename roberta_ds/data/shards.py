"""THE on-disk token format: `.bin/.idx` shards (Megatron's byte layout), their writer and the reader of one shard.

`ShardReader` maps the small `.idx` and reads `.bin` tokens only with `os.pread` (bin_file.py), so a
shard that changes while it is read gives an error naming the file, never a SIGBUS.

A shard set is a directory holding shards and one `manifest.json`:

    <set>/manifest.json
    <set>/<name>.bin        tokens
    <set>/<name>.idx        index

Format spec (version 1; byte-compatible with megatron-core's `IndexedDataset`)
------------------------------------------------------------------------------
`.bin` holds the tokens of every sequence back to back, little-endian, in the dtype named by the
`.idx` header, with no header and no padding. Tokens are `uint16` when the vocabulary has at most
65,536 ids and `int32` otherwise.

`.idx` is little-endian, S = number of sequences, D = number of document-index entries:

    offset        size   field
    0             9      magic  b"MMIDIDX\\x00\\x00"
    9             8      uint64 version = 1
    17            1      uint8  dtype code (megatron-core's DType: 1 uint8, 2 int8, 3 int16,
                                4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    18            8      uint64 S
    26            8      uint64 D
    34            4 S    int32  sequence lengths, in tokens
    34 + 4 S      8 S    int64  sequence pointers, byte offsets into .bin
    34 + 12 S     8 D    int64  document indices

The file is exactly 34 + 12 S + 8 D bytes. Pointers start at 0 and each is the previous one plus
the previous length times the dtype size; the `.bin` is exactly (last pointer + last length x size)
bytes. Document indices are 0 followed by, for each document, the index one past its last
sequence: non-decreasing, ending at S, so D = documents + 1. A sequence is one sentence/line of a
document; keeping the boundaries lets training pack FULL-SENTENCES or DOC-SENTENCES blocks of any
length without re-tokenizing.

We write dtype codes 8 (uint16) and 4 (int32) and read every integer code (1-5, 8). Float codes are
refused (fairseq and megatron disagree on what code 6/7 mean; token shards never need them).
Two look-alikes are refused by name: fairseq's layout (same magic and version but no document
count or indices: 26 + 12 S bytes) and megatron-core's multimodal extension (an extra int8 mode per
sequence: 34 + 13 S + 8 D bytes).

The manifest beside the shards, and opening or verifying a whole set: shard_set.py.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from roberta_ds.data.bin_file import DescriptorCache, ShardFile
from roberta_ds.durable import file_sha256, fsync_dir
from roberta_ds.errors import ShardFormatError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 34  # magic 9 + version 8 + dtype 1 + S 8 + D 8
FORMAT_NAME = "roberta-ds-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CHUNK_TOKENS = 1 << 24
"""Tokens per read of a whole-shard pass (`ShardReader.iter_token_chunks`): bounds its memory."""

# megatron-core's DType enum; pinned here because fairseq uses the same magic with another code 6/7.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
INTEGER_CODES = (1, 2, 3, 4, 5, 8)
CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65,536), else int32."""
    if vocab_size <= 0:
        raise ShardFormatError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of tokenizer.json's bytes; `path` is the file or a directory containing it."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ShardFormatError(f"{p}: tokenizer.json not found (give the tokenizer directory or file)")
    return file_sha256(p)


# ----------------------------------------------------------------------------------------------
# Writing


def index_header(sequences: int, document_entries: int, dtype: np.dtype) -> bytes:
    """The 34 header bytes of a `.idx` file."""
    return MAGIC + struct.pack("<QBQQ", VERSION, CODE_OF[np.dtype(dtype)], sequences, document_entries)


def write_index(
    f: BinaryIO, lengths: list[np.ndarray], document_indices: list[np.ndarray], dtype: np.dtype
) -> None:
    """Stream a `.idx` to `f` from chunks of sequence lengths and of document indices (0 included).

    Chunk by chunk, so closing a shard of millions of sequences needs no whole-index copies.
    """
    itemsize = np.dtype(dtype).itemsize
    f.write(index_header(sum(map(len, lengths)), sum(map(len, document_indices)), dtype))
    for chunk in lengths:
        f.write(np.asarray(chunk).astype("<i4").tobytes())
    offset = 0  # byte offset of the next sequence in the .bin
    for chunk in lengths:
        step = np.asarray(chunk, dtype=np.int64) * itemsize
        pointers = np.cumsum(step) - step + offset  # exclusive prefix sum: where each sequence starts
        f.write(pointers.astype("<i8").tobytes())
        offset += int(step.sum())
    for chunk in document_indices:
        f.write(np.asarray(chunk).astype("<i8").tobytes())


def encode_index(lengths: np.ndarray, document_indices: np.ndarray, dtype: np.dtype) -> bytes:
    """The exact bytes of a `.idx` file (see the module docstring)."""
    buf = io.BytesIO()
    write_index(buf, [np.asarray(lengths)], [np.asarray(document_indices)], dtype)
    return buf.getvalue()


@dataclass(frozen=True)
class ShardStats:
    """What one finished shard holds (the manifest's per-shard entry, minus checksums)."""

    sequences: int
    tokens: int
    documents: int


def checked_cast(ids: np.ndarray, dtype: np.dtype, where: str | os.PathLike) -> np.ndarray:
    """`ids` as `dtype`, refusing ids that do not fit (70000 as uint16 would silently read back as 4464)."""
    ids = np.asarray(ids)
    dtype = np.dtype(dtype)
    if ids.dtype == dtype:
        return ids
    if ids.dtype.kind not in "iub":
        raise ShardFormatError(f"{where}: token ids must be integers, got dtype {ids.dtype}")
    if ids.size:
        info = np.iinfo(dtype)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < info.min or hi > info.max:
            bad = hi if hi > info.max else lo
            raise ShardFormatError(
                f"{where}: token id {bad} does not fit {dtype} (range {info.min}..{info.max}); "
                "a vocabulary over 65,536 ids needs int32 shards"
            )
    return ids.astype(dtype)


class ShardWriter:
    """Streams sequences into `<prefix>.bin`; `close()` writes the `.idx` and renames both into place.

    Both files are written under temp names (`<prefix>.bin.tmp` ...) and renamed only when complete,
    `.bin` first, so a visible `.idx` always has its full `.bin`. Use as a context manager: an
    exception inside the block removes the temp files. Memory: 4 bytes per sequence and 8 per
    document (the index, streamed out in chunks at close); the tokens go straight to disk.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF or CODE_OF[self.dtype] not in INTEGER_CODES:
            raise ShardFormatError(f"{self.prefix}: token dtype must be an integer type, got {self.dtype}")
        self._disk_dtype = self.dtype.newbyteorder("<")
        self._bin_tmp = Path(f"{bin_path(self.prefix)}.tmp")
        self._idx_tmp = Path(f"{idx_path(self.prefix)}.tmp")
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[np.ndarray] = []  # int32 chunks of sequence lengths
        self._doc_ends: list[np.ndarray] = [np.zeros(1, np.int64)]  # int64 chunks of document indices
        self._open_lengths: list[int] = []  # added one at a time since the last flush
        self._open_doc_ends: list[int] = []
        self._sequences = 0
        self._documents = 0
        self._last_doc_end = 0
        self._tokens = 0
        self._closed = False

    @property
    def tokens(self) -> int:
        """Tokens written so far."""
        return self._tokens

    @property
    def documents(self) -> int:
        """Documents closed so far."""
        return self._documents

    def _write_tokens(self, ids: np.ndarray) -> None:
        self._bin.write(ids.astype(self._disk_dtype, copy=False).tobytes())

    def _flush_open(self) -> None:
        if self._open_lengths:
            self._lengths.append(np.asarray(self._open_lengths, dtype=np.int32))
            self._open_lengths = []
        if self._open_doc_ends:
            self._doc_ends.append(np.asarray(self._open_doc_ends, dtype=np.int64))
            self._open_doc_ends = []

    def add_sequence(self, tokens: np.ndarray | list[int]) -> None:
        """Append one sequence (a sentence) to the current document."""
        arr = np.asarray(tokens)
        if arr.ndim != 1 or arr.size == 0:
            raise ShardFormatError(f"{self.prefix}: a sequence must be a non-empty 1-D array of token ids")
        arr = checked_cast(arr, self.dtype, self.prefix)
        self._write_tokens(arr)
        self._open_lengths.append(int(arr.size))
        self._sequences += 1
        self._tokens += int(arr.size)
        if len(self._open_lengths) >= 1 << 16:
            self._flush_open()

    def end_document(self) -> None:
        """Close the current document (a no-op for a document with no sequences)."""
        if self._last_doc_end != self._sequences:
            self._open_doc_ends.append(self._sequences)
            self._last_doc_end = self._sequences
            self._documents += 1

    def add_documents(
        self, tokens: np.ndarray, sequence_lengths: np.ndarray, document_sequences: np.ndarray
    ) -> None:
        """Append whole documents at once (the fast path).

        tokens: (T,) ids of every sequence back to back; sequence_lengths: (S,) summing to T, each
        > 0; document_sequences: (D,) sequences per document, each > 0, summing to S.
        """
        lengths = np.asarray(sequence_lengths, dtype=np.int64)
        per_doc = np.asarray(document_sequences, dtype=np.int64)
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or lengths.ndim != 1 or per_doc.ndim != 1:
            raise ShardFormatError(f"{self.prefix}: add_documents takes 1-D arrays")
        if int(lengths.sum()) != tokens.size or int(per_doc.sum()) != lengths.size:
            raise ShardFormatError(
                f"{self.prefix}: {tokens.size} tokens, sequence lengths summing to {int(lengths.sum())} "
                f"({lengths.size} sequences), documents covering {int(per_doc.sum())} sequences: inconsistent"
            )
        if lengths.size and int(lengths.min()) <= 0 or per_doc.size and int(per_doc.min()) <= 0:
            raise ShardFormatError(f"{self.prefix}: empty sequences or documents cannot be stored")
        if lengths.size and int(lengths.max()) > np.iinfo(np.int32).max:
            raise ShardFormatError(f"{self.prefix}: a sequence longer than 2**31 tokens cannot be indexed")
        self.end_document()  # sequences added one at a time before this belong to a finished document
        self._flush_open()
        self._write_tokens(checked_cast(tokens, self.dtype, self.prefix))
        self._lengths.append(lengths.astype(np.int32))
        self._doc_ends.append(self._sequences + np.cumsum(per_doc))
        self._sequences += int(lengths.size)
        self._tokens += int(tokens.size)
        self._documents += int(per_doc.size)
        self._last_doc_end = self._sequences

    def close(self) -> ShardStats:
        if self._closed:
            raise ShardFormatError(f"{self.prefix}: writer already closed")
        self.end_document()
        self._flush_open()
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        with open(self._idx_tmp, "wb") as f:
            write_index(f, self._lengths, self._doc_ends, self.dtype)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(self._idx_tmp, idx_path(self.prefix))
        fsync_dir(self.prefix.parent)
        self._closed = True
        return ShardStats(self._sequences, self._tokens, self._documents)

    def abort(self) -> None:
        """Drop everything written so far (temp files only; nothing visible was created)."""
        if not self._bin.closed:
            self._bin.close()
        for p in (self._bin_tmp, self._idx_tmp):
            p.unlink(missing_ok=True)
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class IndexHeader:
    dtype: np.dtype
    sequences: int
    doc_entries: int


def read_index_header(path: Path) -> IndexHeader:
    """Parse and check the header and exact size of an `.idx` file; names what is wrong."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise ShardFormatError(f"{path}: file not found") from None
    if len(head) < 9 or head[:9] != MAGIC:
        if head[:8] == b"TNTIDX\x00\x00":
            raise ShardFormatError(f"{path}: fairseq/Megatron *lazy* (TNTIDX) index, not an mmap shard")
        raise ShardFormatError(f"{path}: bad magic {head[:9]!r}, expected {MAGIC!r}: not an .idx shard index")
    if len(head) < 26:
        raise ShardFormatError(f"{path}: truncated header ({size} bytes, need {HEADER_BYTES})")
    (version,) = struct.unpack("<Q", head[9:17])
    if version != VERSION:
        raise ShardFormatError(f"{path}: unsupported index version {version} (this reader knows {VERSION})")
    code = head[17]
    (seqs,) = struct.unpack("<Q", head[18:26])
    # fairseq writes the same magic and version but no document count/indices: 26 + 12 S bytes.
    if size == 26 + 12 * seqs:
        raise ShardFormatError(
            f"{path}: fairseq MMapIndexedDataset layout (no document count or document indices); "
            "re-tokenize the text with `roberta-ds build-shards` (or convert it with Megatron's tools)"
        )
    if code not in DTYPE_CODES:
        raise ShardFormatError(f"{path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
    if code not in INTEGER_CODES:
        raise ShardFormatError(
            f"{path}: dtype code {code} ({DTYPE_CODES[code]}) is not an integer token type; "
            "token shards use code 8 (uint16) or 4 (int32)"
        )
    if len(head) < HEADER_BYTES:
        raise ShardFormatError(f"{path}: truncated header ({size} bytes, need {HEADER_BYTES})")
    (docs,) = struct.unpack("<Q", head[26:34])
    expected = HEADER_BYTES + 12 * seqs + 8 * docs
    if size == expected + seqs and seqs:
        raise ShardFormatError(f"{path}: megatron-core multimodal index (sequence modes); not a token shard")
    if size != expected:
        raise ShardFormatError(
            f"{path}: size {size} bytes, but its header ({seqs} sequences, {docs} document entries) "
            f"needs exactly {expected}: the file is truncated or corrupt"
        )
    return IndexHeader(DTYPE_CODES[code], seqs, docs)


class ShardReader:
    """One shard: its index, memory-mapped from the `.idx`, and its tokens, read from the `.bin` with
    `os.pread` through a `ShardFile` (bin_file.py), the one `.bin` reader.

    Opening checks the header, exact `.idx` size and exact `.bin` size (cheap); `verify_shard` does
    the full check. The `.bin` is never mapped: a shard truncated, replaced or deleted after opening
    gives a ShardFormatError naming the file, not a SIGBUS. Whole-shard passes go chunk by chunk
    (`iter_token_chunks`). `descriptors` bounds the open `.bin` descriptors of many readers (None:
    this reader's stays open until `close()`). Pickles as its prefix and reopens lazily, so
    DataLoader workers each read through their own descriptors.
    """

    def __init__(self, prefix: str | os.PathLike, descriptors: DescriptorCache | None = None) -> None:
        self.prefix = Path(prefix)
        self._open(descriptors)

    def _open(self, descriptors: DescriptorCache | None) -> None:
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        header = read_index_header(ipath)
        self.dtype = header.dtype
        s, d = header.sequences, header.doc_entries
        self._idx = np.memmap(ipath, mode="r", dtype=np.uint8)
        off = HEADER_BYTES
        self.sequence_lengths = np.frombuffer(self._idx, dtype="<i4", count=s, offset=off)
        self.sequence_pointers = np.frombuffer(self._idx, dtype="<i8", count=s, offset=off + 4 * s)
        self.document_indices = np.frombuffer(self._idx, dtype="<i8", count=d, offset=off + 12 * s)
        expected = (
            int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if s else 0
        )
        try:
            st = bpath.stat()
        except FileNotFoundError:
            raise ShardFormatError(f"{bpath}: file not found (its index {ipath.name} exists)") from None
        if st.st_size != expected:
            raise ShardFormatError(
                f"{bpath}: size {st.st_size} bytes, but {ipath.name} describes {expected}: "
                "the .bin is truncated or does not belong to this index"
            )
        self.bin = ShardFile(bpath, self.dtype, (st.st_dev, st.st_ino, st.st_size), descriptors)

    def __getstate__(self) -> dict[str, Any]:
        return {"prefix": str(self.prefix), "descriptors": self.bin.cache}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.prefix = Path(state["prefix"])
        self._open(state.get("descriptors"))

    def close(self) -> None:
        """Close the `.bin` descriptor (a later read reopens it, checking it is the same file)."""
        self.bin.close()

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    @property
    def bin_tokens(self) -> int:
        """Tokens the `.bin` holds (its size over the dtype's; equals `num_tokens` in a valid shard)."""
        return self.bin.identity[2] // self.dtype.itemsize

    def token_offsets(self) -> np.ndarray:
        """Element (not byte) offset of every sequence into the `.bin` (int64, length S)."""
        return self.sequence_pointers // self.dtype.itemsize

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of the `.bin` (element offsets), as a read-only array."""
        if start < 0 or count < 0 or start + count > self.bin_tokens:
            raise IndexError(
                f"{self.prefix}: tokens [{start}, {start + count}) out of range ({self.bin_tokens} tokens)"
            )
        return self.bin.read(start, count)

    def iter_token_chunks(self, chunk_tokens: int = CHUNK_TOKENS) -> Iterator[tuple[int, np.ndarray]]:
        """(start, tokens) for consecutive chunks of at most `chunk_tokens` covering the whole `.bin`:
        whole-shard passes (counts, ranges, checks) in bounded memory. Checks first that the path
        is still the file opened, with its size."""
        n = self.bin_tokens
        if n:
            self.bin.check()
        for start in range(0, n, chunk_tokens):
            yield start, self.bin.read(start, min(chunk_tokens, n - start))

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.prefix}: sequence {i} out of range ({n} sequences)")
        i %= n
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.bin.read(start, int(self.sequence_lengths[i]))

    def document(self, d: int) -> list[np.ndarray]:
        lo, hi = int(self.document_indices[d]), int(self.document_indices[d + 1])
        return [self[i] for i in range(lo, hi)]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]
