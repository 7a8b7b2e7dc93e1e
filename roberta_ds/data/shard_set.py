"""A shard set: the shards of one directory and its `manifest.json`; opening and verifying a whole set.

The shards' byte format and the reader of one shard are shards.py's.

`manifest.json` (written last, atomically: temp name, fsync, rename) describes the set:
format name and version, tokenizer fingerprint (sha256 of tokenizer.json bytes), vocab size,
special token ids, token dtype, per-shard sequence/token/document counts, byte sizes and sha256
checksums, `created_by` (the command, its inputs and settings) and, optionally, `token_stats`: the
unigram entropy and top-1 share of the set's maskable tokens (roberta_ds/data/unigram.py; `verify`
recounts them). A directory without a manifest is not a shard set, so a build killed mid-way never
looks valid.

Compatibility: readers ignore manifest fields they do not know. A field may be added within a
format version only when a reader that ignores it still reads the set correctly, and a reader must
not require it (`token_stats` is such a field: sets written before it are counted on the fly);
anything else (a changed meaning, a required field, another byte layout) bumps FORMAT_VERSION,
which readers refuse when it is not theirs. megatron-core reads only the `.bin/.idx` pair.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from roberta_ds.data.bin_file import DescriptorCache
from roberta_ds.data.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    ShardReader,
    ShardStats,
    bin_path,
    idx_path,
    read_index_header,
    token_dtype,
)
from roberta_ds.durable import atomic_write_bytes, file_sha256, read_json_object
from roberta_ds.errors import ShardFormatError


@dataclass(frozen=True)
class ShardInfo:
    name: str
    sequences: int
    tokens: int
    documents: int
    bin_bytes: int
    idx_bytes: int
    bin_sha256: str
    idx_sha256: str


@dataclass(frozen=True)
class Manifest:
    tokenizer_sha256: str
    vocab_size: int
    special_ids: dict[str, int]
    """At least bos, pad, eos, unk, mask."""
    dtype: str
    shards: tuple[ShardInfo, ...]
    created_by: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    token_stats: dict[str, Any] | None = None
    """Unigram statistics of the maskable tokens (roberta_ds/data/unigram.py); None in sets written before them."""

    @property
    def sequences(self) -> int:
        return sum(s.sequences for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        if d["token_stats"] is None:
            del d["token_stats"]  # written like a manifest from before the field
        d["totals"] = {"sequences": self.sequences, "tokens": self.tokens, "documents": self.documents}
        return json.dumps(d, indent=2, sort_keys=True) + "\n"


REQUIRED_SPECIALS = ("bos", "pad", "eos", "unk", "mask")


def shard_info(prefix: str | os.PathLike, stats: ShardStats | None = None) -> ShardInfo:
    """Measure a finished shard for the manifest (counts from the index when stats are not given)."""
    prefix = Path(prefix)
    if stats is None:
        r = ShardReader(prefix)
        stats = ShardStats(len(r), r.num_tokens, r.num_documents)
    return ShardInfo(
        name=prefix.name,
        sequences=stats.sequences,
        tokens=stats.tokens,
        documents=stats.documents,
        bin_bytes=bin_path(prefix).stat().st_size,
        idx_bytes=idx_path(prefix).stat().st_size,
        bin_sha256=file_sha256(bin_path(prefix)),
        idx_sha256=file_sha256(idx_path(prefix)),
    )


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> Path:
    """Atomically (temp + fsync + rename) write `<directory>/manifest.json`; call it last."""
    path = Path(directory) / MANIFEST_NAME
    atomic_write_bytes(path, manifest.to_json().encode())
    return path


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Load and validate a shard set's manifest; errors name the file and the field."""
    directory = Path(directory)
    path = (
        directory / MANIFEST_NAME if directory.is_dir() or not directory.name.endswith(".json") else directory
    )
    if not path.is_file():
        hint = " (a build that did not finish leaves no manifest; rerun it)" if directory.is_dir() else ""
        raise ShardFormatError(f"{path}: no manifest; {directory} is not a complete shard set{hint}")
    raw = read_json_object(path, ShardFormatError, "not valid JSON", "expected a JSON object")
    if raw.get("format") != FORMAT_NAME:
        raise ShardFormatError(f"{path}: field 'format' is {raw.get('format')!r}, expected {FORMAT_NAME!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(
            f"{path}: field 'format_version' is {raw.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )
    try:
        shards = tuple(ShardInfo(**s) for s in raw["shards"])
        manifest = Manifest(
            tokenizer_sha256=str(raw["tokenizer_sha256"]),
            vocab_size=int(raw["vocab_size"]),
            special_ids={str(k): int(v) for k, v in raw["special_ids"].items()},
            dtype=str(raw["dtype"]),
            shards=shards,
            created_by=dict(raw.get("created_by", {})),
            token_stats=raw.get("token_stats"),
        )
    except KeyError as e:
        raise ShardFormatError(f"{path}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise ShardFormatError(f"{path}: malformed field ({e})") from None
    missing = [k for k in REQUIRED_SPECIALS if k not in manifest.special_ids]
    if missing:
        raise ShardFormatError(f"{path}: special_ids lacks {missing}")
    try:
        dtype = np.dtype(manifest.dtype)
    except TypeError:
        raise ShardFormatError(f"{path}: field 'dtype' is {manifest.dtype!r}, not a numpy dtype") from None
    if dtype != token_dtype(manifest.vocab_size) and dtype != np.int32:
        raise ShardFormatError(f"{path}: dtype {manifest.dtype} cannot hold vocab_size {manifest.vocab_size}")
    if manifest.token_stats is not None:
        from roberta_ds.data.unigram import (
            UnigramStats,  # its module reads shards: imported here, not at the top
        )

        UnigramStats.from_manifest(manifest.token_stats, str(path))
    return manifest


def check_tokenizer(manifest: Manifest, fingerprint: str, where: str) -> None:
    """Refuse a shard set made with another tokenizer than the one in use."""
    if manifest.tokenizer_sha256 != fingerprint:
        raise ShardFormatError(
            f"{where}: made with tokenizer sha256 {manifest.tokenizer_sha256[:12]}..., but the tokenizer "
            f"given has {fingerprint[:12]}...; re-tokenize the corpus or pass the tokenizer it was built with"
        )


def open_shards(
    directory: str | os.PathLike, descriptors: DescriptorCache | None = None
) -> tuple[Manifest, list[ShardReader]]:
    """The manifest and a reader per shard, checking each shard's files against the manifest sizes.

    The readers share `descriptors` (a new DescriptorCache when None), so reading a set of thousands
    of shards keeps at most its `max_open` `.bin` descriptors open."""
    directory = Path(directory)
    if descriptors is None:
        descriptors = DescriptorCache()
    manifest = read_manifest(directory)
    readers = []
    for info in manifest.shards:
        prefix = directory / info.name
        for p, want in ((bin_path(prefix), info.bin_bytes), (idx_path(prefix), info.idx_bytes)):
            if not p.is_file():
                raise ShardFormatError(f"{p}: listed in {directory / MANIFEST_NAME} but missing")
            if p.stat().st_size != want:
                raise ShardFormatError(
                    f"{p}: {p.stat().st_size} bytes, manifest says {want}: truncated or replaced after the build"
                )
        readers.append(ShardReader(prefix, descriptors))
    return manifest, readers


# ----------------------------------------------------------------------------------------------
# Full verification


def verify_shard(
    prefix: str | os.PathLike, vocab_size: int | None = None, info: ShardInfo | None = None
) -> ShardStats:
    """Every structural check on one shard; raises ShardFormatError naming the file and the problem.

    Header and exact sizes, pointers consistent with lengths, document indices (start 0,
    non-decreasing, end at S), every token id in [0, vocab_size), and checksums against `info`.
    """
    prefix = Path(prefix)
    r = ShardReader(prefix)
    ipath, bpath = idx_path(prefix), bin_path(prefix)
    lengths = r.sequence_lengths.astype(np.int64)
    if (lengths < 0).any():
        i = int(np.argmax(lengths < 0))
        raise ShardFormatError(f"{ipath}: sequence {i} has negative length {lengths[i]}")
    expected_ptr = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1] * r.dtype.itemsize, out=expected_ptr[1:])
    bad = np.nonzero(r.sequence_pointers != expected_ptr)[0]
    if bad.size:
        i = int(bad[0])
        raise ShardFormatError(
            f"{ipath}: pointer of sequence {i} is {int(r.sequence_pointers[i])}, expected {int(expected_ptr[i])} "
            "(pointers must be contiguous and monotonic)"
        )
    doc = r.document_indices
    if len(doc) == 0 or doc[0] != 0:
        raise ShardFormatError(f"{ipath}: document indices must start with 0")
    if (np.diff(doc) < 0).any():
        i = int(np.argmax(np.diff(doc) < 0))
        raise ShardFormatError(f"{ipath}: document indices decrease at entry {i + 1}")
    if int(doc[-1]) != len(r):
        raise ShardFormatError(
            f"{ipath}: last document index is {int(doc[-1])}, expected {len(r)} (the sequence count)"
        )
    if vocab_size is not None:
        for start, part in r.iter_token_chunks():
            hi, lo = int(part.max()), int(part.min())
            if hi >= vocab_size or lo < 0:
                at = int(np.argmax((part >= vocab_size) | (part < 0)))
                seq = int(np.searchsorted(r.token_offsets(), start + at, side="right")) - 1
                raise ShardFormatError(
                    f"{bpath}: token id {int(part[at])} at token {start + at} (sequence {seq}) is outside "
                    f"the vocabulary of {vocab_size}"
                )
    if info is not None:
        for p, size, digest in (
            (bpath, info.bin_bytes, info.bin_sha256),
            (ipath, info.idx_bytes, info.idx_sha256),
        ):
            if p.stat().st_size != size:
                raise ShardFormatError(f"{p}: {p.stat().st_size} bytes, manifest says {size}")
            actual = file_sha256(p)
            if actual != digest:
                raise ShardFormatError(
                    f"{p}: sha256 {actual[:16]}... differs from the manifest's {digest[:16]}...: corrupt"
                )
        counts = (len(r), r.num_tokens, r.num_documents)
        if counts != (info.sequences, info.tokens, info.documents):
            raise ShardFormatError(
                f"{ipath}: holds (sequences, tokens, documents) = {counts}, manifest says "
                f"{(info.sequences, info.tokens, info.documents)}"
            )
    return ShardStats(len(r), r.num_tokens, r.num_documents)


def verify_set(directory: str | os.PathLike, tokenizer_sha256: str | None = None) -> Manifest:
    """Verify a whole shard set: manifest, every shard in full, and optionally the tokenizer."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if tokenizer_sha256 is not None:
        check_tokenizer(manifest, tokenizer_sha256, str(directory / MANIFEST_NAME))
    for info in manifest.shards:
        prefix = directory / info.name
        for p in (bin_path(prefix), idx_path(prefix)):
            if not p.is_file():
                raise ShardFormatError(f"{p}: listed in {directory / MANIFEST_NAME} but missing")
        dtype = read_index_header(idx_path(prefix)).dtype
        if dtype != np.dtype(manifest.dtype):
            raise ShardFormatError(
                f"{idx_path(prefix)}: dtype {dtype}, but the manifest says {manifest.dtype}"
            )
        verify_shard(prefix, manifest.vocab_size, info)
    from roberta_ds.data.unigram import check_stored_stats

    check_stored_stats(directory, manifest)
    return manifest
