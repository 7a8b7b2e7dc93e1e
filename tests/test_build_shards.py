"""Input reading, sentence splitting and build_shards: content, determinism, resume, bad input."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_SHARD_TOKENS, SMALL_VALID_FRACTION

from data_tools.build_shards import build_shards, is_valid_document
from data_tools.encode import encode_documents
from data_tools.text_input import ReadStats, iter_documents, resolve_inputs, split_sequences
from roberta_ds import cli
from roberta_ds.data.shard_set import open_shards, read_manifest, verify_set
from roberta_ds.data.tokenizer import decode, load_tokenizer, load_tokenizer_info, special_ids_of
from roberta_ds.errors import ShardFormatError, UserError


def read_all(paths, **kw) -> tuple[list[str], ReadStats]:
    stats = ReadStats()
    return list(iter_documents([Path(p) for p in paths], stats=stats, **kw)), stats


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- reading ------------------------------------------------------------------------------------


def test_txt_documents_and_gz(tmp_path):
    text = "First line.\nSecond line.\n\n   \nDoc two, only line.\n\n\n\nDoc three\r\nends here"
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode()))
    docs, stats = read_all([tmp_path / "a.txt"])
    assert docs == ["First line.\nSecond line.\n", "Doc two, only line.\n", "Doc three\r\nends here"]
    assert stats.documents == 3 and stats.text_bytes == sum(len(d.encode()) for d in docs)
    assert read_all([tmp_path / "a.txt.gz"])[0] == docs


def test_jsonl_fields_blank_and_gz(tmp_path):
    lines = [{"text": "one"}, {"body": "x", "text": "  "}, {"text": ""}, {"text": "two\n\nthree"}]
    raw = "\n".join(json.dumps(x) for x in lines) + "\n\n"
    (tmp_path / "d.jsonl").write_text(raw)
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(raw.encode()))
    docs, stats = read_all([tmp_path / "d.jsonl", tmp_path / "d.jsonl.gz"])
    assert docs == ["one", "two\n\nthree"] * 2
    assert stats.skipped_empty == 4 and stats.files == 2
    (tmp_path / "e.jsonl").write_text('{"body": "alt field"}\n')
    assert read_all([tmp_path / "e.jsonl"], text_field="body")[0] == ["alt field"]
    with pytest.raises(UserError, match=r"e.jsonl:1: no field 'text' \(fields: \['body'\]\).*--text-field"):
        read_all([tmp_path / "e.jsonl"])


@pytest.mark.parametrize(
    "content,message",
    [
        (b'{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n', r"bad.jsonl:3: invalid JSON"),
        (b'{"text": "ok"}\n[1, 2]\n', r"bad.jsonl:2: expected a JSON object"),
        (b'{"text": 5}\n', r"bad.jsonl:1: field 'text' is int"),
        (
            b'{"text": "caf\xe9"}\n',
            r"bad.jsonl:1: not UTF-8 \(byte 0xe9 at column 14\).*--on-decode-error=replace",
        ),
        (b'{"text": "lone \\ud800 surrogate"}\n', r"bad.jsonl:1: text holds an unpaired surrogate"),
    ],
)
def test_bad_jsonl_named(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_all([tmp_path / "bad.jsonl"])


def test_decode_error_replace_counts(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 and \xff\xfe bytes, a real \xef\xbf\xbd too\n")
    with pytest.raises(UserError, match=r"b.txt:1: not UTF-8"):
        read_all([tmp_path / "b.txt"])
    docs, stats = read_all([tmp_path / "b.txt"], on_decode_error="replace")
    assert docs == ["caf\ufffd and \ufffd\ufffd bytes, a real \ufffd too\n"]
    assert stats.replacements == 3, "the genuine U+FFFD in the file is not a replacement"
    (tmp_path / "s.jsonl").write_text('{"text": "a \\ud800 b"}\n')
    docs, stats = read_all([tmp_path / "s.jsonl"], on_decode_error="replace")
    assert docs == ["a \ufffd b"] and stats.replacements == 1


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(UserError, match="no input files"):
        resolve_inputs([])
    with pytest.raises(UserError, match="nope.txt: input file not found"):
        resolve_inputs([tmp_path / "nope.txt"])
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="input directory holds no files"):
        resolve_inputs([tmp_path / "d"])
    (tmp_path / "d" / "z.txt").write_bytes(b"")
    with pytest.raises(UserError, match="z.txt: input file is empty"):
        resolve_inputs([tmp_path / "d"])


# ---- sequences ----------------------------------------------------------------------------------


def test_split_sequences_examples():
    assert split_sequences("One. Two!  Three?\nFour\n\nFive.") == [
        "One.",
        " Two!",
        "  Three?\n",
        "Four\n\n",
        "Five.",
    ]
    assert split_sequences("e.g. lower stays. 3 starts") == ["e.g. lower stays.", " 3 starts"]
    assert split_sequences('He said "Hi." Then left.') == ['He said "Hi."', " Then left."]
    assert split_sequences("\n\n  lead\n   \nend\n\n") == ["\n\n  lead\n", "   \nend\n\n"]
    assert split_sequences("x") == ["x"]


def test_split_sequences_round_trip(builtin_corpus):
    for doc in iter_documents(resolve_inputs([builtin_corpus])):
        pieces = split_sequences(doc)
        assert "".join(pieces) == doc
        assert all(p and not p.isspace() for p in pieces)


TRICKY = [
    "Plain line.\nSecond line. Third sentence!\n",
    "ünïcödé café. Ünder the tree 😀 emoji. Next\n",
    "Indented:\n    code. Block\n\n\n   \nafter blank lines\n",
    "A literal </s> and <mask> and <s> are text. Right",
    "tabs\tand\r\nCRLF lines. End",
]


@pytest.mark.parametrize("whole", [True, False], ids=["whole-document", "per-sentence"])
def test_encode_documents_paths(small_tokenizer, builtin_corpus, monkeypatch, whole):
    """Both encoding paths: every document decodes back exactly, no special ids, sentences cut right."""
    from tokenizers import Tokenizer

    import data_tools.encode as bs

    tok = Tokenizer.from_file(str(small_tokenizer / "tokenizer.json"))
    table = bs.token_byte_lengths(tok) if whole else None
    assert bs.token_byte_lengths(tok) is not None, "our byte-level BPE must take the fast path"
    docs = TRICKY + list(iter_documents(resolve_inputs([builtin_corpus])))[:300]
    monkeypatch.setattr(bs, "LONG_DOCUMENT_BYTES", 600)  # long documents mix in the per-sentence path
    tokens, lengths, per_doc = encode_documents(tok, docs, np.dtype(np.uint16), 2048, table)
    assert per_doc.size == len(docs) and per_doc.sum() == lengths.size and lengths.sum() == tokens.size
    specials = list(special_ids_of(tok, small_tokenizer).values())  # <mask> is the last id, not 4
    assert len(specials) == 5 and (lengths > 0).all() and not np.isin(tokens, specials).any()
    s, t = 0, 0
    for d, text in enumerate(docs):
        seqs = []
        for n in lengths[s : s + per_doc[d]]:
            seqs.append(tokens[t : t + n].tolist())
            t += n
        s += per_doc[d]
        assert "".join(tok.decode(x) for x in seqs) == text
        if whole and len(text) <= 600:
            assert [i for x in seqs for i in x] == tok.encode(text, add_special_tokens=False).ids
        assert len(seqs) <= len(split_sequences(text))


def test_encode_documents_refuses_wrap():
    """A tokenizer emitting id 70000 into uint16 shards is an error, never a silent 4464."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {"<unk>": 0, "small": 1, "big": 70000}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokens, lengths, per_doc = encode_documents(tok, ["small small"], np.dtype(np.int32), 70001)
    assert tokens.tolist() == [1, 1]
    with pytest.raises(ShardFormatError, match="token id 70000 does not fit uint16"):
        encode_documents(tok, ["small big"], np.dtype(np.uint16), 70001)
    with pytest.raises(UserError, match="outside its vocabulary"):
        encode_documents(tok, ["big"], np.dtype(np.int32), 100)


# ---- the fixture build --------------------------------------------------------------------------


def test_small_shards_reproduce_the_corpus(small_shards, small_tokenizer, builtin_corpus):
    """Every document is stored, in order, as sequences that decode back to its exact text."""
    docs = list(iter_documents(resolve_inputs([builtin_corpus])))
    tok = load_tokenizer(small_tokenizer)
    info = load_tokenizer_info(small_tokenizer)
    seen = {"train": [], "valid": []}
    for split in seen:
        manifest, readers = open_shards(small_shards / split)
        assert manifest.tokenizer_sha256 == info.sha256 and manifest.vocab_size == 2048
        assert manifest.special_ids == info.special_ids and manifest.dtype == "uint16"
        for r in readers:
            for d in range(r.num_documents):
                seqs = r.document(d)
                assert all(0 not in s and 2 not in s for s in seqs), "sequences carry no <s>/</s>"
                seen[split].append(
                    "".join(tok.decode_batch([s.tolist() for s in seqs], skip_special_tokens=False))
                )
    expected = {
        "train": [d for d in docs if not is_valid_document(d, 1, SMALL_VALID_FRACTION)],
        "valid": [d for d in docs if is_valid_document(d, 1, SMALL_VALID_FRACTION)],
    }
    assert seen == expected
    assert 0.02 < len(seen["valid"]) / len(docs) < 0.09
    # A document's tokens are exactly its whole encoding, cut at sentence ends.
    _, readers = open_shards(small_shards / "train")
    for d in (0, 1, 2):
        seqs = [s.tolist() for s in readers[0].document(d)]
        assert [i for x in seqs for i in x] == tok.encode(expected["train"][d], add_special_tokens=False).ids
        assert [tok.decode(s) for s in seqs] == split_sequences(expected["train"][d])


def test_small_shards_layout(small_shards):
    train = read_manifest(small_shards / "train")
    assert len(train.shards) >= 3 and [s.name for s in train.shards][:2] == ["shard-00000", "shard-00001"]
    for s in train.shards[:-1]:
        assert s.tokens >= SMALL_SHARD_TOKENS, "a shard closes only after the document that fills it"
    assert train.created_by["command"] == "roberta-ds build-shards"
    assert train.created_by["split"] == "train" and train.created_by["documents_read"] > 2000
    for split in ("train", "valid"):
        verify_set(small_shards / split)
    raw = (small_shards / "train" / "manifest.json").read_text()
    assert "worker" not in raw and "time" not in raw, "nothing that varies run to run"


# ---- determinism and resume --------------------------------------------------------------------


def test_output_identical_for_any_worker_count(tmp_path, builtin_corpus, small_tokenizer, small_shards):
    kw = dict(valid_fraction=SMALL_VALID_FRACTION, shard_tokens=SMALL_SHARD_TOKENS)
    build_shards([builtin_corpus], small_tokenizer, tmp_path / "w1", workers=1, **kw)
    assert tree_bytes(tmp_path / "w1") == tree_bytes(small_shards)  # the fixture used 2 workers
    build_shards(
        [builtin_corpus],
        small_tokenizer,
        tmp_path / "w3",
        workers=3,
        shard_tokens=SMALL_SHARD_TOKENS,
        valid_fraction=SMALL_VALID_FRACTION,
    )
    assert tree_bytes(tmp_path / "w3") == tree_bytes(small_shards)


def test_resume_after_partial_build(tmp_path, builtin_corpus, small_tokenizer, small_shards):
    out = tmp_path / "out"
    kw = dict(valid_fraction=SMALL_VALID_FRACTION, shard_tokens=SMALL_SHARD_TOKENS)
    build_shards([builtin_corpus], small_tokenizer, out, workers=2, **kw)
    # Make it look like a build killed while writing train shard 1: no manifests, later shards
    # gone, temp files and a .bin renamed without its .idx left behind.
    for split in ("train", "valid"):
        (out / split / "manifest.json").unlink()
    for p in (out / "train").glob("shard-0000[2-9].*"):
        p.unlink()
    (out / "train" / "shard-00001.idx").unlink()
    (out / "train" / "shard-00002.bin.tmp").write_bytes(b"partial")
    with pytest.raises(ShardFormatError, match="no manifest"):
        read_manifest(out / "train")
    build_shards([builtin_corpus], small_tokenizer, out, workers=2, **kw)
    assert tree_bytes(out) == tree_bytes(small_shards)
    # A complete build reruns as a no-op.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.bin")}
    build_shards([builtin_corpus], small_tokenizer, out, workers=1, **kw)
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.bin")}


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path, builtin_corpus, small_tokenizer):
    """Kill a real build (process group) once its first shard is on disk; a rerun completes it identically."""
    args = [
        str(builtin_corpus),
        "--tokenizer",
        str(small_tokenizer),
        "--workers",
        "2",
        "--shard-tokens",
        "20000",
        "--valid-fraction",
        "0.05",
        "--quiet",
    ]
    out = tmp_path / "killed"
    code = "import sys; from roberta_ds.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "build-shards", *args, "--out", str(out)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "train" / "shard-00002.idx").exists():
            break
        time.sleep(0.01)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_mid_way = not (out / "train" / "manifest.json").exists()
    assert cli.main(["build-shards", *args, "--out", str(out)]) == 0
    assert cli.main(["build-shards", *args, "--out", str(tmp_path / "clean")]) == 0
    assert tree_bytes(out) == tree_bytes(tmp_path / "clean")
    if not killed_mid_way:
        pytest.skip("the build finished before it could be killed (machine too fast); resume not exercised")


def test_script_without_main_guard_fails_cleanly(tmp_path, builtin_corpus, small_tokenizer):
    """Spawned workers re-import the main script; without a __main__ guard: a clear error, no hang."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from data_tools.build_shards import build_shards\n"
        f"build_shards([{str(builtin_corpus)!r}], {str(small_tokenizer)!r}, {str(tmp_path / 'o')!r}, workers=2)\n"
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "under `if __name__ == '__main__':`" in r.stderr
    assert not any((tmp_path / "o").rglob("manifest.json"))


def test_rerun_with_other_settings_refused(tmp_path, builtin_corpus, small_tokenizer):
    src = sorted(builtin_corpus.iterdir())[:1]
    build_shards(src, small_tokenizer, tmp_path / "o", valid_fraction=0.1)
    with pytest.raises(
        UserError, match=r"holds a build with other settings \(differs in \['valid_fraction'\]\)"
    ):
        build_shards(src, small_tokenizer, tmp_path / "o", valid_fraction=0.2)
    m = build_shards(
        src, small_tokenizer, tmp_path / "o", valid_fraction=0.2, overwrite=True, shard_tokens=10_000
    )
    assert m["valid"].created_by["valid_fraction"] == 0.2 and len(m["train"].shards) > 1
    verify_set(tmp_path / "o" / "train")


def test_int32_shards_for_large_vocab(tmp_path, small_tokenizer):
    """A vocabulary over 65,536 ids gives int32 shards holding ids above 65,535 exactly."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(small_tokenizer / "tokenizer.json"))
    tok.add_tokens([f"zzword{i}" for i in range(64_000)])
    big = tmp_path / "big"
    big.mkdir()
    tok.save(str(big / "tokenizer.json"))
    text = "Plain words and zzword63999 and zzword5 end.\n"
    (tmp_path / "c.txt").write_text(text * 3)
    m = build_shards([tmp_path / "c.txt"], big, tmp_path / "o", valid_fraction=0.0)
    assert m["train"].dtype == "int32" and m["train"].vocab_size == 66_048
    _, readers = open_shards(tmp_path / "o" / "train")
    ids = np.concatenate(list(readers[0]))
    assert ids.max() == 2048 + 63_999
    assert "".join(decode(big, s) for s in readers[0]) == text * 3
    verify_set(tmp_path / "o" / "train")


# ---- bad input leaves nothing that looks valid ---------------------------------------------------


def test_zero_usable_documents(tmp_path, small_tokenizer):
    (tmp_path / "blank.jsonl").write_text('{"text": "  "}\n{"text": "\\n\\t"}\n')
    with pytest.raises(UserError, match=r"no usable documents in 1 input file\(s\): 2 empty"):
        build_shards([tmp_path / "blank.jsonl"], small_tokenizer, tmp_path / "o")
    assert not any((tmp_path / "o").rglob("manifest.json")) and not (tmp_path / "o" / "build.json").exists()


def test_bad_input_mid_build_leaves_no_manifest(tmp_path, builtin_corpus, small_tokenizer):
    good = sorted(builtin_corpus.iterdir())[0]
    bad = tmp_path / "z.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n' * 5 + b'{"text": "broken\n')
    with pytest.raises(UserError, match=r"z.jsonl:6: invalid JSON"):
        build_shards([good, bad], small_tokenizer, tmp_path / "o", workers=2, shard_tokens=5_000)
    assert not any((tmp_path / "o").rglob("manifest.json"))
    assert not any((tmp_path / "o").rglob("*.tmp")), "temp files are removed on error"
    with pytest.raises(ShardFormatError, match="no manifest"):
        open_shards(tmp_path / "o" / "train")


def test_replace_mode_counts_in_manifest(tmp_path, small_tokenizer):
    (tmp_path / "x.txt").write_bytes(b"Bad \xff byte here.\n\nAnd a good document.\n\n   \n")
    with pytest.raises(UserError, match=r"x.txt:1: not UTF-8"):
        build_shards([tmp_path / "x.txt"], small_tokenizer, tmp_path / "o")
    m = build_shards(
        [tmp_path / "x.txt"], small_tokenizer, tmp_path / "o2", on_decode_error="replace", valid_fraction=0.0
    )
    assert m["train"].created_by["decode_replacements"] == 1
    assert m["train"].documents == 2 and len(m["valid"].shards) == 0


def test_tokenizer_errors(tmp_path, builtin_corpus):
    with pytest.raises(UserError, match="tokenizer.json not found"):
        build_shards([builtin_corpus], tmp_path / "none", tmp_path / "o")


def test_cli_build(tmp_path, builtin_corpus, small_tokenizer, capsys):
    src = str(sorted(builtin_corpus.iterdir())[0])
    rc = cli.main(
        [
            "build-shards",
            src,
            "--tokenizer",
            str(small_tokenizer),
            "--out",
            str(tmp_path / "o"),
            "--workers",
            "1",
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "train: 1 shard(s)" in out
    rc = cli.main(
        [
            "build-shards",
            src,
            "--tokenizer",
            str(small_tokenizer),
            "--out",
            str(tmp_path / "o"),
            "--valid-fraction",
            "1.5",
        ]
    )
    assert rc == 1 and "--valid-fraction: must be in [0, 1)" in capsys.readouterr().err
