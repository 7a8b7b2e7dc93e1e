"""The shard format module: golden bytes, spec offsets, reader/writer round trips, every refusal."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from roberta_ds.data.shard_set import (
    Manifest,
    check_tokenizer,
    open_shards,
    read_manifest,
    shard_info,
    verify_set,
    verify_shard,
    write_manifest,
)
from roberta_ds.data.shards import (
    MAGIC,
    ShardReader,
    ShardWriter,
    bin_path,
    encode_index,
    idx_path,
    token_dtype,
)
from roberta_ds.durable import atomic_write_bytes
from roberta_ds.errors import ShardFormatError

GOLDEN = Path(__file__).parent / "golden"
# The golden shards: documents of sentences. tiny_int32 holds ids that only int32 can carry.
GOLDEN_DOCS = {
    "tiny_uint16": (np.uint16, [[[5, 6, 7], [8]], [[9, 65535]]]),
    "tiny_int32": (np.int32, [[[5, 70000, 7], [8]], [[9, 2**31 - 1]]]),
}
SPECIALS = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}


def write_docs(prefix: Path, dtype, docs) -> None:
    with ShardWriter(prefix, dtype) as w:
        for doc in docs:
            for seq in doc:
                w.add_sequence(seq)
            w.end_document()


def spec_bytes(dtype, docs) -> tuple[bytes, bytes]:
    """The .idx/.bin bytes written out by hand from the prose spec (independent of encode_index)."""
    dtype = np.dtype(dtype)
    code = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}[dtype]
    seqs = [s for d in docs for s in d]
    lengths = [len(s) for s in seqs]
    pointers = [sum(lengths[:i]) * dtype.itemsize for i in range(len(seqs))]
    doc_index = [0]
    for d in docs:
        doc_index.append(doc_index[-1] + len(d))
    idx = MAGIC + struct.pack("<QBQQ", 1, code, len(seqs), len(doc_index))
    idx += struct.pack(f"<{len(seqs)}i", *lengths) + struct.pack(f"<{len(seqs)}q", *pointers)
    idx += struct.pack(f"<{len(doc_index)}q", *doc_index)
    fmt = {8: "H", 4: "i"}[code]
    binary = b"".join(struct.pack(f"<{len(s)}{fmt}", *s) for s in seqs)
    return idx, binary


@pytest.mark.parametrize("name", sorted(GOLDEN_DOCS))
def test_golden_bytes(tmp_path, name):
    dtype, docs = GOLDEN_DOCS[name]
    idx, binary = spec_bytes(dtype, docs)
    golden = GOLDEN / name
    assert idx_path(golden).read_bytes() == idx, "golden .idx no longer matches the spec"
    assert bin_path(golden).read_bytes() == binary
    write_docs(tmp_path / name, dtype, docs)
    assert idx_path(tmp_path / name).read_bytes() == idx
    assert bin_path(tmp_path / name).read_bytes() == binary
    r = ShardReader(golden)
    assert r.dtype == np.dtype(dtype)
    assert [list(map(int, s)) for s in r] == [s for d in docs for s in d]
    assert r.document_indices.tolist() == [0, 2, 3]
    assert [len(r.document(i)) for i in range(r.num_documents)] == [2, 1]
    verify_shard(golden, vocab_size=2**31)


def test_header_layout():
    data = encode_index(np.array([3, 1]), np.array([0, 2]), np.uint16)
    assert data[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<Q", data[9:17]) == (1,)
    assert data[17] == 8
    assert struct.unpack("<QQ", data[18:34]) == (2, 2)
    assert len(data) == 34 + 12 * 2 + 8 * 2
    assert encode_index(np.array([3]), np.array([0, 1]), np.int32)[17] == 4


def test_token_dtype():
    assert token_dtype(50265) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.int32
    with pytest.raises(ShardFormatError):
        token_dtype(0)


def test_bulk_and_single_writes_are_identical(tmp_path):
    rng = np.random.default_rng(0)
    docs = [
        [rng.integers(0, 60000, int(rng.integers(1, 30))).tolist() for _ in range(int(rng.integers(1, 6)))]
        for _ in range(40)
    ]
    write_docs(tmp_path / "single", np.uint16, docs)
    with ShardWriter(tmp_path / "bulk", np.uint16) as w:
        for part in (docs[:7], docs[7:8], docs[8:]):
            seqs = [s for d in part for s in d]
            w.add_documents(
                np.concatenate([np.asarray(s) for s in seqs]),
                np.array([len(s) for s in seqs]),
                np.array([len(d) for d in part]),
            )
    for p in (idx_path, bin_path):
        assert p(tmp_path / "single").read_bytes() == p(tmp_path / "bulk").read_bytes()


def test_add_documents_checks_consistency(tmp_path):
    with pytest.raises(ShardFormatError, match="inconsistent"):
        with ShardWriter(tmp_path / "s", np.uint16) as w:
            w.add_documents(np.arange(5), np.array([2, 2]), np.array([2]))
    with pytest.raises(ShardFormatError, match="empty"), ShardWriter(tmp_path / "s", np.uint16) as w:
        w.add_documents(np.arange(2), np.array([2, 0]), np.array([2]))
    assert not list(tmp_path.iterdir()), "a failed writer must leave nothing behind"


def test_no_silent_wrap(tmp_path):
    with pytest.raises(ShardFormatError, match="token id 70000 does not fit uint16"):
        with ShardWriter(tmp_path / "s", np.uint16) as w:
            w.add_sequence([1, 70000])
    with pytest.raises(ShardFormatError, match="-1 does not fit"):
        with ShardWriter(tmp_path / "s", np.uint16) as w:
            w.add_sequence(np.array([-1, 2], dtype=np.int64))
    with pytest.raises(ShardFormatError, match="does not fit uint16"):
        with ShardWriter(tmp_path / "s", np.uint16) as w:
            w.add_documents(np.array([1, 70000]), np.array([2]), np.array([1]))
    with pytest.raises(ShardFormatError, match="integers"), ShardWriter(tmp_path / "s", np.uint16) as w:
        w.add_sequence(np.array([1.5]))
    with pytest.raises(ShardFormatError, match="integer type"):
        ShardWriter(tmp_path / "f", np.float32)
    assert not list(tmp_path.iterdir())


def test_reader_pickles_as_its_path(tmp_path):
    write_docs(tmp_path / "s", np.uint16, [[[1, 2, 3]], [[4], [5, 6]]])
    r = ShardReader(tmp_path / "s")
    state = pickle.dumps(r)
    assert len(state) < 200, "the reader must pickle as its path, not its data"
    r2 = pickle.loads(state)
    assert [s.tolist() for s in r2] == [[1, 2, 3], [4], [5, 6]]
    with pytest.raises(IndexError):
        r2[3]
    assert r2[-1].tolist() == [5, 6]


@pytest.mark.parametrize("opened", [False, True])
def test_reader_names_a_bin_truncated_after_opening(tmp_path, opened):
    # Tokens come through pread, never a map: truncation is a named error, not a SIGBUS.
    write_docs(tmp_path / "s", np.uint16, [[[1, 2, 3]], [[4], [5, 6]]])
    r = ShardReader(tmp_path / "s")
    if opened:
        assert r[0].tolist() == [1, 2, 3]  # the descriptor is open now
    os.truncate(bin_path(tmp_path / "s"), 4)
    with pytest.raises(ShardFormatError, match=r"s\.bin: truncated"):
        r[2]
    with pytest.raises(ShardFormatError, match=r"s\.bin: truncated"):
        list(r.iter_token_chunks())
    with pytest.raises(ShardFormatError, match=r"s\.bin: size 4 bytes.*truncated"):
        verify_shard(tmp_path / "s", vocab_size=10)


def test_reader_reads_tokens_in_chunks(tmp_path):
    write_docs(tmp_path / "s", np.uint16, [[[1, 2, 3]], [[4], [5, 6]]])
    r = ShardReader(tmp_path / "s")
    assert r.bin_tokens == r.num_tokens == 6
    assert r.read(1, 4).tolist() == [2, 3, 4, 5] and r.read(6, 0).tolist() == []
    assert [(start, t.tolist()) for start, t in r.iter_token_chunks(4)] == [(0, [1, 2, 3, 4]), (4, [5, 6])]
    with pytest.raises(IndexError, match="out of range"):
        r.read(5, 2)


def test_empty_shard(tmp_path):
    ShardWriter(tmp_path / "e", np.uint16).close()
    r = ShardReader(tmp_path / "e")
    assert len(r) == 0 and r.num_documents == 0 and r.num_tokens == 0
    verify_shard(tmp_path / "e", vocab_size=10)


def test_killed_writer_leaves_nothing_valid(tmp_path):
    w = ShardWriter(tmp_path / "s", np.uint16)
    w.add_sequence([1, 2, 3])
    # The process dies here: nothing was renamed into place.
    assert not idx_path(tmp_path / "s").exists() and not bin_path(tmp_path / "s").exists()
    with pytest.raises(ShardFormatError, match="not found"):
        ShardReader(tmp_path / "s")
    w.abort()
    assert not list(tmp_path.iterdir())


# ---- refusals of bad files, each naming the file and the problem -------------------------------


@pytest.fixture
def shard(tmp_path) -> Path:
    write_docs(tmp_path / "s", np.uint16, [[[5, 6, 7], [8]], [[9, 10]]])
    return tmp_path / "s"


def _patch(path: Path, offset: int, data: bytes) -> None:
    b = bytearray(path.read_bytes())
    b[offset : offset + len(data)] = data
    path.write_bytes(bytes(b))


@pytest.mark.parametrize(
    "offset,data,message",
    [
        (0, b"XXIDIDX\x00\x00", "bad magic"),
        (9, struct.pack("<Q", 2), "unsupported index version 2"),
        (17, bytes([9]), "unknown dtype code 9"),
        (17, bytes([7]), "not an integer token type"),
        (18, struct.pack("<Q", 4), "truncated or corrupt"),
    ],
)
def test_bad_header(shard, offset, data, message):
    _patch(idx_path(shard), offset, data)
    with pytest.raises(ShardFormatError, match=message) as e:
        ShardReader(shard)
    assert str(idx_path(shard)) in str(e.value)


def test_truncated_files(shard):
    data = idx_path(shard).read_bytes()
    idx_path(shard).write_bytes(data[:-3])
    with pytest.raises(ShardFormatError, match=r"s\.idx: size .* truncated"):
        ShardReader(shard)
    idx_path(shard).write_bytes(data[:20])
    with pytest.raises(ShardFormatError, match="truncated header"):
        ShardReader(shard)
    idx_path(shard).write_bytes(data)
    bin_path(shard).write_bytes(bin_path(shard).read_bytes()[:-2])
    with pytest.raises(ShardFormatError, match=r"s\.bin: size 10 bytes, but s\.idx describes 12"):
        ShardReader(shard)
    bin_path(shard).unlink()
    with pytest.raises(ShardFormatError, match=r"s\.bin: file not found"):
        ShardReader(shard)


def test_fairseq_and_lookalikes_named(tmp_path):
    # fairseq's MMapIndexedDataset: same magic and version, no document count or indices.
    lengths = [3, 1]
    fairseq = MAGIC + struct.pack("<QBQ", 1, 8, 2) + struct.pack("<2i", *lengths) + struct.pack("<2q", 0, 6)
    idx_path(tmp_path / "f").write_bytes(fairseq)
    bin_path(tmp_path / "f").write_bytes(b"\x00" * 8)
    with pytest.raises(ShardFormatError, match="fairseq MMapIndexedDataset layout"):
        ShardReader(tmp_path / "f")
    # Megatron's multimodal extension: one int8 mode per sequence after the document indices.
    mm = encode_index(np.array(lengths), np.array([0, 2]), np.uint16) + b"\x00\x00"
    idx_path(tmp_path / "m").write_bytes(mm)
    with pytest.raises(ShardFormatError, match="multimodal"):
        ShardReader(tmp_path / "m")
    idx_path(tmp_path / "t").write_bytes(b"TNTIDX\x00\x00" + b"\x00" * 40)
    with pytest.raises(ShardFormatError, match="lazy"):
        ShardReader(tmp_path / "t")


def test_verify_finds_structural_damage(shard):
    verify_shard(shard, vocab_size=11)
    with pytest.raises(
        ShardFormatError, match=r"token id 10 at token 5 \(sequence 2\) is outside the vocabulary of 10"
    ):
        verify_shard(shard, vocab_size=10)
    ipath = idx_path(shard)
    good = ipath.read_bytes()
    s = 3
    _patch(ipath, 34 + 4 * s + 8, struct.pack("<q", 4))  # pointer of sequence 1: 4 instead of 6
    with pytest.raises(ShardFormatError, match="pointer of sequence 1 is 4, expected 6"):
        verify_shard(shard)
    ipath.write_bytes(good)
    _patch(ipath, 34 + 12 * s + 8, struct.pack("<q", 5))  # document index past the sequence count
    with pytest.raises(ShardFormatError, match="decrease|last document index"):
        verify_shard(shard)
    ipath.write_bytes(good)
    _patch(ipath, 34 + 12 * s + 16, struct.pack("<q", 2))
    with pytest.raises(ShardFormatError, match="last document index is 2, expected 3"):
        verify_shard(shard)


def _manifest_for(directory: Path, vocab_size: int = 100) -> Manifest:
    infos = tuple(shard_info(p.with_suffix("")) for p in sorted(directory.glob("*.idx")))
    return Manifest(
        tokenizer_sha256="ab" * 32,
        vocab_size=vocab_size,
        special_ids=SPECIALS,
        dtype="uint16",
        shards=infos,
        created_by={"command": "test"},
    )


def test_manifest_round_trip_and_checksums(shard):
    d = shard.parent
    m = _manifest_for(d)
    write_manifest(d, m)
    assert read_manifest(d) == m
    raw = json.loads((d / "manifest.json").read_text())
    assert raw["totals"] == {"documents": 2, "sequences": 3, "tokens": 6}
    assert raw["format"] == "roberta-ds-shards" and raw["format_version"] == 1
    assert not [p for p in d.iterdir() if "tmp" in p.name], "atomic write left a temp file"
    assert verify_set(d, "ab" * 32) == m
    # One flipped bit in the .bin: same size, valid ids, caught by the checksum.
    _patch(bin_path(shard), 0, bytes([5 ^ 1]))
    with pytest.raises(ShardFormatError, match=r"s\.bin: sha256 .* differs from the manifest"):
        verify_set(d)
    with pytest.raises(ShardFormatError, match="made with tokenizer sha256 abab"):
        check_tokenizer(m, "cd" * 32, "here")
    with pytest.raises(ShardFormatError, match="made with tokenizer"):
        verify_set(d, "cd" * 32)


def test_open_shards_checks_sizes(shard):
    d = shard.parent
    write_manifest(d, _manifest_for(d))
    manifest, readers = open_shards(d)
    assert [len(r) for r in readers] == [3]
    bin_path(shard).write_bytes(bin_path(shard).read_bytes() + b"\x00\x00")
    with pytest.raises(ShardFormatError, match="manifest says 12"):
        open_shards(d)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.update(format="other"), "field 'format'"),
        (lambda m: m.update(format_version=2), "format_version"),
        (lambda m: m.pop("vocab_size"), "missing field 'vocab_size'"),
        (lambda m: m["special_ids"].pop("mask"), "special_ids lacks"),
        (lambda m: m.update(dtype="float32"), "cannot hold"),
        (lambda m: m.update(dtype="nonsense"), "not a numpy dtype"),
        (lambda m: m.update(shards=[{"name": "x"}]), "malformed"),
    ],
)
def test_manifest_refusals(shard, edit, message):
    d = shard.parent
    write_manifest(d, _manifest_for(d))
    raw = json.loads((d / "manifest.json").read_text())
    edit(raw)
    (d / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ShardFormatError, match=message):
        read_manifest(d)


def test_missing_or_invalid_manifest(tmp_path):
    with pytest.raises(ShardFormatError, match="no manifest.*did not finish"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardFormatError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_atomic_write_bytes(tmp_path):
    atomic_write_bytes(tmp_path / "f", b"one")
    atomic_write_bytes(tmp_path / "f", b"two")
    assert (tmp_path / "f").read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_checks_hold_under_python_O(shard):
    """Validation uses exceptions, not assert: it must still refuse bad files with -O."""
    _patch(idx_path(shard), 0, b"XX")
    code = (
        "import sys; from roberta_ds.data.shards import ShardReader\n"
        "try:\n    ShardReader(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e); sys.exit(3)\n"
    )
    r = subprocess.run([sys.executable, "-O", "-c", code, str(shard)], capture_output=True, text=True)
    assert r.returncode == 3 and "ShardFormatError" in r.stdout and "bad magic" in r.stdout, (
        r.stdout + r.stderr
    )
