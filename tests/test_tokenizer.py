"""Tokenizer training/adoption and roberta_ds.data.tokenizer: HF loading, round trips, special ids, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_tools.text_input import iter_documents, resolve_inputs
from data_tools.train_tokenizer import adopt_tokenizer, train_tokenizer
from roberta_ds import cli
from roberta_ds.data.shards import tokenizer_fingerprint
from roberta_ds.data.tokenizer import decode, load_tokenizer, load_tokenizer_info, word_start_table
from roberta_ds.errors import UserError

HF_FILES = {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
SAMPLE = "Return the value.\nIt is  computed lazily: naïve café, ünïcödé and emoji 😀\tdone."


def corpus_docs(corpus: Path, n: int = 200) -> list[str]:
    docs = []
    for d in iter_documents(resolve_inputs([corpus])):
        docs.append(d)
        if len(docs) == n:
            break
    return docs


def test_trained_files_and_info(small_tokenizer):
    assert HF_FILES <= {p.name for p in small_tokenizer.iterdir()}
    info = load_tokenizer_info(small_tokenizer)
    assert info.vocab_size == 2048
    # RoBERTa's layout: <mask> takes the last id (roberta-base: 50264 of 50265), in vocab.json too.
    assert info.special_ids == {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 2047}
    assert json.loads((small_tokenizer / "vocab.json").read_text())["<mask>"] == 2047
    assert info.sha256 == tokenizer_fingerprint(small_tokenizer)
    assert load_tokenizer_info(small_tokenizer / "tokenizer.json") == info
    tok = load_tokenizer(small_tokenizer)
    enc = tok.encode("Hello world")
    assert enc.ids[0] == 0 and enc.ids[-1] == 2, "RoBERTa post-processing: <s> X </s>"
    assert tok.encode("Hello world", add_special_tokens=False).ids == enc.ids[1:-1]
    config = json.loads((small_tokenizer / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "RobertaTokenizer" and config["model_max_length"] == 512


def test_autotokenizer_loads_roberta_fast(small_tokenizer, builtin_corpus):
    from transformers import AutoTokenizer, RobertaTokenizerFast

    hf = AutoTokenizer.from_pretrained(str(small_tokenizer))
    assert isinstance(hf, RobertaTokenizerFast) and hf.is_fast
    assert (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id, hf.unk_token_id, hf.mask_token_id) == (
        0,
        1,
        2,
        3,
        2047,
    )
    assert len(hf) == 2048
    tok = load_tokenizer(small_tokenizer)
    for text in [SAMPLE, *corpus_docs(builtin_corpus, 100)]:
        ids = hf(text)["input_ids"]
        assert ids == tok.encode(text).ids, "HF and tokenizers disagree"
        assert ids[0] == 0 and ids[-1] == 2
        plain = hf(text, add_special_tokens=False)["input_ids"]
        assert hf.decode(plain) == text, "byte-level BPE must round-trip text exactly"
    masked = hf("The answer is <mask>.")["input_ids"]
    assert masked[-3:] == [2047, hf.convert_tokens_to_ids("."), 2]  # lstrip: the space goes with <mask>
    assert tok.encode("The answer is <mask>.").ids == masked
    slow = AutoTokenizer.from_pretrained(str(small_tokenizer), use_fast=False)  # vocab.json + merges.txt
    assert slow("The answer is <mask>.")["input_ids"] == masked


def test_training_is_deterministic_and_streams_gz(tmp_path, builtin_corpus):
    import gzip

    src = sorted(builtin_corpus.iterdir())[0]
    gz = tmp_path / "part.jsonl.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    a = train_tokenizer([src], tmp_path / "a", vocab_size=600)
    b = train_tokenizer([gz], tmp_path / "b", vocab_size=600)
    assert a.read_bytes() == b.read_bytes()
    assert load_tokenizer_info(a).vocab_size == 600


def test_txt_training_input(tmp_path):
    (tmp_path / "c.txt").write_text(
        "The cat sat on the mat.\nThe dog sat too.\n\nAnother document here.\n" * 50
    )
    out = train_tokenizer([tmp_path / "c.txt"], tmp_path / "tok", vocab_size=512, min_frequency=1)
    assert decode(out.parent, load_tokenizer(out.parent).encode("The cat sat.").ids) == "<s>The cat sat.</s>"


def test_adopt_keeps_bytes_and_loads(tmp_path, small_tokenizer):
    from transformers import AutoTokenizer

    out = adopt_tokenizer(small_tokenizer / "tokenizer.json", tmp_path / "adopted")
    assert out.read_bytes() == (small_tokenizer / "tokenizer.json").read_bytes()
    assert HF_FILES <= {p.name for p in out.parent.iterdir()}
    hf = AutoTokenizer.from_pretrained(str(out.parent))
    assert hf.decode(hf(SAMPLE, add_special_tokens=False)["input_ids"]) == SAMPLE


def roberta_base_like(tmp_path: Path) -> Path:
    """A tokenizer laid out like roberta-base's: <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> the last id."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    vocab["Ġt"] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=[("Ġ", "t")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", AddedToken("<mask>", lstrip=True, special=True)])
    path = tmp_path / "rb" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return path


def test_adopt_roberta_base_layout(tmp_path):
    from transformers import AutoTokenizer

    src = roberta_base_like(tmp_path)
    out = adopt_tokenizer(src, tmp_path / "adopted")
    info = load_tokenizer_info(out)
    assert info.special_ids == {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": info.vocab_size - 1}
    hf = AutoTokenizer.from_pretrained(str(out.parent))
    assert hf.mask_token_id == info.vocab_size - 1
    assert hf.decode(hf(" to tea", add_special_tokens=False)["input_ids"]) == " to tea"


def test_adopt_refuses_missing_specials_and_junk(tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab={"<s>": 0, "a": 1}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.save(str(tmp_path / "bad.json"))
    with pytest.raises(
        UserError, match=r"lacks the special token\(s\) \['<pad>', '</s>', '<unk>', '<mask>'\]"
    ):
        adopt_tokenizer(tmp_path / "bad.json", tmp_path / "out")
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(UserError, match="junk.json: not a valid tokenizer.json"):
        adopt_tokenizer(tmp_path / "junk.json", tmp_path / "out")
    with pytest.raises(UserError, match="tokenizer.json not found"):
        load_tokenizer_info(tmp_path / "nowhere")
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_word_start_table(small_tokenizer):
    table = word_start_table(small_tokenizer)
    info = load_tokenizer_info(small_tokenizer)
    assert table.dtype == np.bool_ and table.shape == (info.vocab_size,)
    assert all(table[i] for i in info.special_ids.values())
    tok = load_tokenizer(small_tokenizer)
    vocab = tok.get_vocab()
    for token, i in vocab.items():
        if token.startswith("Ġ"):
            assert table[i]
    ids = tok.encode("the module", add_special_tokens=False).ids
    assert not table[ids[0]], "'the' at the start has no leading space"
    assert table[ids[1]], "' module' begins a word"
    assert 0.2 < table.mean() < 0.9


def test_decode(small_tokenizer):
    tok = load_tokenizer(small_tokenizer)
    assert decode(small_tokenizer, tok.encode(SAMPLE).ids) == f"<s>{SAMPLE}</s>"
    assert (
        decode(small_tokenizer, np.array(tok.encode(SAMPLE, add_special_tokens=False).ids, np.uint16))
        == SAMPLE
    )


def test_training_errors(tmp_path):
    with pytest.raises(UserError, match="input file not found"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "t")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(UserError, match="empty.txt: input file is empty"):
        train_tokenizer([tmp_path / "empty.txt"], tmp_path / "t")
    (tmp_path / "blank.jsonl").write_text('{"text": "   "}\n{"text": ""}\n')
    with pytest.raises(UserError, match=r"no usable documents .* \(2 empty or whitespace-only skipped\)"):
        train_tokenizer([tmp_path / "blank.jsonl"], tmp_path / "t")
    with pytest.raises(UserError, match="--vocab-size: must be >= 512"):
        train_tokenizer([tmp_path / "blank.jsonl"], tmp_path / "t", vocab_size=100)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: invalid JSON"):
        train_tokenizer([tmp_path / "bad.jsonl"], tmp_path / "t")
    assert not (tmp_path / "t" / "tokenizer.json").exists()


def test_cli(tmp_path, builtin_corpus, capsys):
    src = sorted(builtin_corpus.iterdir())[:1]
    rc = cli.main(["tokenizer", "--out", str(tmp_path / "t"), "--vocab-size", "600", *map(str, src)])
    assert rc == 0 and "vocab 600" in capsys.readouterr().out
    rc = cli.main(
        ["tokenizer", "--out", str(tmp_path / "u"), "--from", str(tmp_path / "t" / "tokenizer.json")]
    )
    assert rc == 0
    rc = cli.main(["tokenizer", "--out", str(tmp_path / "v")])
    assert rc == 1 and "no training inputs" in capsys.readouterr().err
