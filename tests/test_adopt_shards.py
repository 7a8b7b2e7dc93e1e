"""`roberta-ds adopt-shards`: shards written by megatron-core's IndexedDatasetBuilder become a set of ours.

The foreign set is our own train split re-written sequence by sequence through megatron-core's builder
(so its bytes are Megatron's, and the expected manifest is known). After adoption it verifies, trains
(2 ranks, the real trainer) and carries the manifest our build would have written. The refusals use
small builder outputs: an id beyond the vocabulary, `--append-eod` separators, no document boundaries,
a dtype a manifest cannot name, shards outside --out; each leaves no manifest behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from launch import run_trainer, tiny_args

from data_tools.adopt_shards import adopt_shards
from roberta_ds import cli
from roberta_ds.data.shard_set import open_shards, read_manifest, verify_set
from roberta_ds.data.shards import MANIFEST_NAME, ShardReader, bin_path, idx_path
from roberta_ds.data.tokenizer import load_tokenizer_info


@pytest.fixture(scope="module")
def megatron():
    return pytest.importorskip("megatron.core.datasets.indexed_dataset")


def write_with_megatron(megatron, prefix: Path, docs: list[list[np.ndarray]], dtype=np.uint16,
                        end_documents: bool = True) -> Path:
    """One shard through megatron-core's builder: add_item per sequence, end_document per document."""
    import torch

    builder = megatron.IndexedDatasetBuilder(str(bin_path(prefix)), dtype=dtype)
    for doc in docs:
        for seq in doc:
            builder.add_item(torch.from_numpy(np.asarray(seq, dtype=np.int64)))
        if end_documents:
            builder.end_document()
    builder.finalize(str(idx_path(prefix)))
    return prefix


@pytest.fixture(scope="module")
def adopted(megatron, small_shards, small_tokenizer, tmp_path_factory) -> Path:
    """root/train: our train shards re-written by megatron-core under Megatron-style names, adopted
    through the CLI."""
    root = tmp_path_factory.mktemp("megatron_set")
    (root / "train").mkdir()
    _, ours = open_shards(small_shards / "train")
    prefixes = []
    for k, r in enumerate(ours):
        docs = [r.document(d) for d in range(r.num_documents)]
        prefixes.append(write_with_megatron(megatron, root / "train" / f"corpus_{k}_text_sentence", docs))
    rc = cli.main(["adopt-shards", *map(str, prefixes), "--tokenizer", str(small_tokenizer),
                   "--out", str(root / "train")])
    assert rc == 0
    return root


def test_adopted_set_is_what_our_build_writes(adopted, small_shards, small_tokenizer):
    theirs, ours = read_manifest(adopted / "train"), read_manifest(small_shards / "train")
    tok = load_tokenizer_info(small_tokenizer)
    assert (theirs.tokenizer_sha256, theirs.vocab_size, theirs.special_ids, theirs.dtype) == \
        (tok.sha256, tok.vocab_size, tok.special_ids, "uint16") == \
        (ours.tokenizer_sha256, ours.vocab_size, ours.special_ids, ours.dtype)
    assert theirs.special_ids["mask"] == tok.vocab_size - 1
    # Megatron's bytes are ours byte for byte, so the checksums, counts and unigram statistics agree.
    strip = [{k: v for k, v in s.__dict__.items() if k != "name"} for s in theirs.shards]
    assert strip == [{k: v for k, v in s.__dict__.items() if k != "name"} for s in ours.shards]
    assert theirs.token_stats == ours.token_stats
    assert [s.name for s in theirs.shards] == [f"corpus_{k}_text_sentence" for k in range(len(ours.shards))]
    # Nothing copied: the directory holds the builder's files and the manifest, and `verify` passes.
    assert sorted(p.name for p in (adopted / "train").iterdir()) == sorted(
        [MANIFEST_NAME] + [f"{s.name}{ext}" for s in theirs.shards for ext in (".bin", ".idx")])
    assert verify_set(adopted / "train", tok.sha256) == theirs
    assert cli.main(["verify", str(adopted / "train"), "--tokenizer", str(small_tokenizer)]) == 0
    assert cli.main(["inspect", str(adopted / "train"), "--decode", "0", "--tokenizer", str(small_tokenizer)]) == 0


def test_adopted_set_trains(adopted, small_tokenizer, tmp_path):
    res = run_trainer(tiny_args(small_tokenizer, adopted, tmp_path / "run", steps=3))
    assert res.returncode == 0, res.output[-3000:]
    losses = res.losses()
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(v) and 4 < v < 12 for v in losses.values()), losses
    # The shipped zero2_bf16.json does not clip (the RoBERTa recipe); DeepSpeed still computes the norm.
    assert "gradient_clipping=" not in " ".join(tiny_args(small_tokenizer, adopted, tmp_path, steps=3))
    norms = [r["grad_norm"] for r in res.metrics() if "loss" in r]
    assert len(norms) == 3 and all(n is not None and np.isfinite(n) and n > 0 for n in norms), norms


def refused(capsys, argv: list[str]) -> str:
    assert cli.main(["adopt-shards", *argv]) == 1
    return capsys.readouterr().err


def test_refusals_name_the_file_and_the_fix(megatron, small_tokenizer, tmp_path, capsys):
    vocab = load_tokenizer_info(small_tokenizer).vocab_size
    tok = ["--tokenizer", str(small_tokenizer)]
    ok_docs = [[np.array([10, 11, 12]), np.array([13])], [np.array([14, 15])]]

    # A token id at the vocabulary size: made with another tokenizer.
    d = tmp_path / "vocab"
    d.mkdir()
    good = write_with_megatron(megatron, d / "a", ok_docs)
    bad = write_with_megatron(megatron, d / "b", [[np.array([10, vocab, 12])]])
    err = refused(capsys, [str(good), str(bad), *tok, "--out", str(d)])
    assert f"{bin_path(bad)}: token id {vocab} at token 1 (sequence 0) is outside the vocabulary of {vocab}" in err
    assert "made with another tokenizer" in err and "roberta-ds build-shards" in err
    assert not (d / MANIFEST_NAME).exists()
    assert cli.main(["verify", str(d)]) == 1                    # not a set yet; the way in is named
    assert f"roberta-ds adopt-shards {d}/NAME ... --tokenizer tok/ --out {d}" in capsys.readouterr().err

    # Megatron's --append-eod: </s> stored in the data.
    d = tmp_path / "eod"
    d.mkdir()
    eod = write_with_megatron(megatron, d / "a", [[np.array([10, 11, 2])], [np.array([12, 2])]])
    err = refused(capsys, [str(eod), *tok, "--out", str(d)])
    assert f"{bin_path(eod)}: holds </s> (id 2) 2 time(s), first in sequence 0" in err
    assert "without --append-eod" in err and not (d / MANIFEST_NAME).exists()

    # No end_document() calls: sequences without document boundaries.
    d = tmp_path / "nodocs"
    d.mkdir()
    nodocs = write_with_megatron(megatron, d / "a", ok_docs, end_documents=False)
    err = refused(capsys, [str(nodocs), *tok, "--out", str(d)])
    assert f"{idx_path(nodocs)}: no document boundaries" in err and "end_document" in err

    # int64 tokens: a manifest names uint16 (or int32) for a 2,048-id vocabulary.
    d = tmp_path / "int64"
    d.mkdir()
    wide = write_with_megatron(megatron, d / "a", ok_docs, dtype=np.int64)
    err = refused(capsys, [str(wide), *tok, "--out", str(d)])
    assert f"{idx_path(wide)}: token dtype int64" in err and "int32 or uint16" in err

    # Shards outside --out: the manifest would name files it does not sit next to.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    err = refused(capsys, [str(good), *tok, "--out", str(elsewhere)])
    assert f"not in --out {elsewhere}" in err and f"pass --out {good.parent}" in err
    assert not list(elsewhere.iterdir())

    # The good shard alone is adopted; a second adoption into the same directory is refused.
    shutil.rmtree(tmp_path / "eod")
    assert adopt_shards([good], small_tokenizer, good.parent, log=lambda s: None).sequences == 3
    assert ShardReader(good).num_documents == 2
    err = refused(capsys, [str(good), *tok, "--out", str(good.parent)])
    assert f"--out {good.parent}: already holds manifest.json" in err
    assert json.loads((good.parent / MANIFEST_NAME).read_text())["created_by"]["command"] == "roberta-ds adopt-shards"
