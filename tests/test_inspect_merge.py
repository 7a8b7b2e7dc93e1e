"""`roberta-ds inspect`, `verify` (every damage named, exit 1) and `merge` on real shard sets."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_tools.merge_shards import merge_shard_sets
from roberta_ds import cli
from roberta_ds.data.shard_set import (
    Manifest,
    ShardInfo,
    open_shards,
    read_manifest,
    shard_info,
    verify_set,
    write_manifest,
)
from roberta_ds.data.shards import bin_path, idx_path
from roberta_ds.data.tokenizer import load_tokenizer
from roberta_ds.errors import UserError


@pytest.fixture
def shards_copy(small_shards, tmp_path) -> Path:
    """A private copy of the session's shards, safe to damage."""
    dst = tmp_path / "copy"
    shutil.copytree(small_shards, dst)
    return dst


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_inspect_counts_histogram_decode(small_shards, small_tokenizer, capsys):
    rc, out, _ = run_cli(capsys, "inspect", small_shards / "train", "--decode", "0", "--document", "1")
    assert rc == 0
    m = read_manifest(small_shards / "train")
    assert f"{m.documents:,} documents, {m.sequences:,} sequences, {m.tokens:,} tokens" in out
    assert "sequence length (tokens): mean" in out and "document length (tokens)" in out
    _, readers = open_shards(small_shards / "train")
    first = readers[0][0]
    text = load_tokenizer(small_tokenizer).decode(first.tolist())
    assert f"sequence 0 (shard-00000 #0, {len(first)} tokens): {text!r}" in out
    assert "document 1 (shard-00000 #1" in out
    rc, out, _ = run_cli(capsys, "inspect", small_shards)  # a build dir: both sets
    assert rc == 0 and "/train:" in out and "/valid:" in out


def test_inspect_decode_errors(small_shards, tmp_path, capsys, builtin_corpus):
    rc, _, err = run_cli(capsys, "inspect", small_shards / "train", "--decode", "99999999")
    assert rc == 1 and "sequence 99999999 out of range" in err
    from data_tools.train_tokenizer import train_tokenizer

    other = train_tokenizer(sorted(builtin_corpus.iterdir())[:1], tmp_path / "other", vocab_size=600).parent
    rc, _, err = run_cli(capsys, "inspect", small_shards / "train", "--decode", "0", "--tokenizer", other)
    assert rc == 1 and "made with tokenizer sha256" in err
    rc, _, err = run_cli(capsys, "inspect", tmp_path)
    assert rc == 1 and "not a shard set" in err


def test_verify_ok(small_shards, small_tokenizer, capsys):
    rc, out, _ = run_cli(capsys, "verify", small_shards, "--tokenizer", small_tokenizer)
    assert rc == 0 and out.count("OK ") == 2


def _flip_bit(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x01
    path.write_bytes(bytes(b))


def _damage_flip_bin(d: Path) -> str:
    _flip_bit(bin_path(d / "train" / "shard-00001"), 1000)
    return r"shard-00001\.bin: sha256 .* differs from the manifest"


def _damage_truncate_bin(d: Path) -> str:
    p = bin_path(d / "train" / "shard-00000")
    p.write_bytes(p.read_bytes()[:-100])
    return r"shard-00000\.bin: size .* truncated"


def _damage_truncate_idx(d: Path) -> str:
    p = idx_path(d / "valid" / "shard-00000")
    p.write_bytes(p.read_bytes()[:-8])
    return r"valid/shard-00000\.idx: size .* truncated or corrupt"


def _damage_magic(d: Path) -> str:
    p = idx_path(d / "train" / "shard-00002")
    p.write_bytes(b"NOTMAGIC!" + p.read_bytes()[9:])
    return r"shard-00002\.idx: bad magic"


def _damage_dtype_code(d: Path) -> str:
    p = idx_path(d / "train" / "shard-00000")
    b = bytearray(p.read_bytes())
    b[17] = 4  # says int32: sizes no longer add up with the .bin
    p.write_bytes(bytes(b))
    return r"shard-00000\.(bin|idx)"


def _damage_killed_mid_write(d: Path) -> str:
    (d / "train" / "manifest.json").unlink()
    (d / "train" / "shard-00003.bin.tmp").write_bytes(b"half")
    return r"no manifest.*not a complete shard set"


def _damage_missing_shard(d: Path) -> str:
    idx_path(d / "train" / "shard-00001").unlink()
    return r"shard-00001\.idx: listed in .* but missing"


def _damage_token_out_of_vocab(d: Path) -> str:
    # A consistent shard (checksums rewritten) holding an id >= vocab: only the token scan sees it.
    set_dir = d / "valid"
    prefix = set_dir / "shard-00000"
    data = bytearray(bin_path(prefix).read_bytes())
    data[2:4] = struct.pack("<H", 5000)
    bin_path(prefix).write_bytes(bytes(data))
    m = read_manifest(set_dir)
    write_manifest(set_dir, Manifest(**{**m.__dict__, "shards": (shard_info(prefix),)}))
    return (
        r"valid/shard-00000\.bin: token id 5000 at token 1 \(sequence 0\) is outside the vocabulary of 2048"
    )


DAMAGES = [
    _damage_flip_bin,
    _damage_truncate_bin,
    _damage_truncate_idx,
    _damage_magic,
    _damage_dtype_code,
    _damage_killed_mid_write,
    _damage_missing_shard,
    _damage_token_out_of_vocab,
]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__[8:])
def test_verify_names_the_damage(shards_copy, capsys, damage):
    message = damage(shards_copy)
    rc, _, err = run_cli(capsys, "verify", shards_copy)
    assert rc == 1, err
    import re

    assert re.search(message, err), err


def test_verify_wrong_tokenizer(shards_copy, tmp_path, capsys, builtin_corpus):
    from data_tools.train_tokenizer import train_tokenizer

    other = train_tokenizer(sorted(builtin_corpus.iterdir())[:1], tmp_path / "other", vocab_size=600).parent
    rc, _, err = run_cli(capsys, "verify", shards_copy / "train", "--tokenizer", other)
    assert rc == 1 and "train/manifest.json: made with tokenizer sha256" in err


def test_verify_exits_nonzero_under_python_O(shards_copy):
    _damage_flip_bin(shards_copy)
    r = subprocess.run(
        [sys.executable, "-O", "-m", "roberta_ds.cli", "verify", str(shards_copy)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "differs from the manifest" in r.stderr


# ---- merge -------------------------------------------------------------------------------------


def test_merge_concatenates(small_shards, tmp_path, capsys):
    rc, out, _ = run_cli(
        capsys, "merge", "--out", tmp_path / "m", small_shards / "train", small_shards / "valid"
    )
    assert rc == 0
    merged = verify_set(tmp_path / "m")
    a, b = read_manifest(small_shards / "train"), read_manifest(small_shards / "valid")
    assert [s.name for s in merged.shards] == [f"shard-{i:05d}" for i in range(len(a.shards) + len(b.shards))]
    assert merged.tokens == a.tokens + b.tokens and merged.documents == a.documents + b.documents
    assert merged.tokenizer_sha256 == a.tokenizer_sha256
    assert [src["path"] for src in merged.created_by["sources"]] == [
        str((small_shards / s).resolve()) for s in ("train", "valid")
    ]
    _, readers = open_shards(tmp_path / "m")
    _, src_readers = open_shards(small_shards / "valid")
    ours, theirs = readers[-1], src_readers[0]
    assert np.array_equal(ours.read(0, ours.bin_tokens), theirs.read(0, theirs.bin_tokens))
    rc, _, err = run_cli(capsys, "merge", "--out", tmp_path / "m", small_shards / "train")
    assert rc == 1 and "already a shard set" in err


def test_merge_refuses_other_tokenizer(small_shards, tmp_path, builtin_corpus):
    from data_tools.build_shards import build_shards
    from data_tools.train_tokenizer import train_tokenizer

    src = sorted(builtin_corpus.iterdir())[:1]
    other_tok = train_tokenizer(src, tmp_path / "tok", vocab_size=600).parent
    build_shards(src, other_tok, tmp_path / "other", valid_fraction=0.0)
    with pytest.raises(UserError, match="differ in tokenizer fingerprint"):
        merge_shard_sets([small_shards / "train", tmp_path / "other" / "train"], tmp_path / "m")
    assert not (tmp_path / "m" / "manifest.json").exists()
    with pytest.raises(UserError, match="is a build directory"):
        merge_shard_sets([small_shards], tmp_path / "m")


def test_merge_refuses_corrupt_source(shards_copy, tmp_path):
    _damage_flip_bin(shards_copy)
    with pytest.raises(UserError, match=r"shard-00001\.bin: size or sha256 differs from its manifest"):
        merge_shard_sets([shards_copy / "train"], tmp_path / "m")
    assert not (tmp_path / "m" / "manifest.json").exists()
    assert not list((tmp_path / "m").glob("*.tmp"))


def test_manifest_shard_entries_are_complete(small_shards):
    raw = json.loads((small_shards / "train" / "manifest.json").read_text())
    fields = {f for f in ShardInfo.__dataclass_fields__}
    assert all(set(s) == fields for s in raw["shards"])
    assert raw["special_ids"] == {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": raw["vocab_size"] - 1}
