"""Synthetic shard sets (and their tokenizer) for the benchmarks: no corpus, no download, seeded.

  - `prepare_data`: a WordLevel tokenizer.json plus Zipf-distributed token shards with real contents,
    for bench/train_throughput.py (the loss can fall; packing sees realistic sentence lengths);
  - `write_synthetic_index`: a valid `.idx` of any size with sparse `.bin` files (no disk, contents
    all zero), for bench/loader.py's "open a 1B-token corpus" case.
Both write the manifest last, through roberta_ds.data.shards, so a half-written set never looks valid.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def cut_points(sizes: np.ndarray, total: int) -> np.ndarray:
    """Where consecutive pieces of `sizes` end, cut at `total`, with `total` last: the boundaries that
    split `total` items into pieces of those sizes (the last one shorter)."""
    ends = np.cumsum(sizes)
    return np.concatenate([ends[ends < total], [total]])


def write_tokenizer(out: Path, vocab_size: int) -> Path:
    """A WordLevel tokenizer.json, RoBERTa's special ids: <s> 0, <pad> 1, </s> 2, <unk> 3, <mask> last."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    specials = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": vocab_size - 1}
    vocab = {f"w{i}": i for i in range(4, vocab_size - 1)} | specials
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tokenizer.json.tmp"
    tok.save(str(tmp))
    os.replace(tmp, out / "tokenizer.json")
    return out


def write_shards(out: Path, tokenizer: Path, tokens: int, shards: int = 2, seed: int = 0) -> Path:
    """~`tokens` ids in `shards` shards: sentences of geometric length (mean 30), ~10 per document,
    ids drawn from a Zipf law (exponent 1.1 over a shuffled vocabulary), so the loss can fall."""
    from roberta_ds.data.shard_set import Manifest, shard_info, write_manifest
    from roberta_ds.data.shards import ShardWriter, token_dtype
    from roberta_ds.data.tokenizer import load_tokenizer_info

    info = load_tokenizer_info(tokenizer)
    v = info.vocab_size
    rng = np.random.default_rng(seed)
    ordinary = rng.permutation(np.arange(4, v - 1))
    p = 1.0 / np.arange(1, len(ordinary) + 1) ** 1.1
    p /= p.sum()
    out.mkdir(parents=True, exist_ok=True)
    infos = []
    for s in range(shards):
        prefix = out / f"shard-{s:05d}"
        ids = ordinary[rng.choice(len(ordinary), size=tokens // shards, p=p)]
        lengths = np.minimum(rng.geometric(1 / 30, size=tokens // 10 + 10), 400)
        ends = cut_points(lengths, len(ids))
        with ShardWriter(prefix, token_dtype(v)) as w:
            for i, sentence in enumerate(np.split(ids, ends[:-1])):
                w.add_sequence(sentence)
                if i % 10 == 9:
                    w.end_document()
        infos.append(shard_info(prefix))
    write_manifest(
        out,
        Manifest(
            tokenizer_sha256=info.sha256,
            vocab_size=v,
            special_ids=info.special_ids,
            dtype=str(token_dtype(v)),
            shards=tuple(infos),
        ),
    )
    return out


def prepare_data(work: Path, vocab_size: int, tokens: int) -> tuple[Path, Path]:
    """(tokenizer dir, train shard set) under `work`, reused when already made with these sizes."""
    tok, train = work / "tokenizer", work / "shards" / "train"
    stamp = work / "data.json"
    want = {"vocab_size": vocab_size, "tokens": tokens, "version": 1}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and (train / "manifest.json").is_file():
        return tok, train
    write_tokenizer(tok, vocab_size)
    write_shards(train, tok, tokens)
    stamp.write_text(json.dumps(want))
    return tok, train


def write_synthetic_index(out: Path, tokens: int, sentences: int, shards: int, seed: int = 0) -> dict:
    """A valid shard set of the given size with sparse .bin files; returns its totals."""
    from roberta_ds.data.shard_set import Manifest, ShardInfo, write_manifest
    from roberta_ds.data.shards import bin_path, encode_index, idx_path, token_dtype

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    mean = tokens / sentences
    infos, total_tokens, total_docs = [], 0, 0
    for i in range(shards):
        s = sentences // shards + (1 if i < sentences % shards else 0)
        lengths = rng.geometric(1.0 / mean, size=s).astype(np.int64)
        lengths[rng.random(s) < 1e-4] = 1500  # a few sentences longer than a block (split)
        doc_sizes = rng.geometric(0.1, size=s // 5 + 10)  # ~10 sentences per document
        doc_indices = np.concatenate([[0], cut_points(doc_sizes, s)])
        prefix = out / f"shard-{i:05d}"
        idx_bytes = encode_index(lengths, doc_indices, token_dtype(50265))
        idx_path(prefix).write_bytes(idx_bytes)
        n_tok = int(lengths.sum())
        with open(bin_path(prefix), "wb") as f:
            f.truncate(n_tok * 2)  # sparse: takes no disk
        infos.append(
            ShardInfo(
                name=prefix.name,
                sequences=s,
                tokens=n_tok,
                documents=len(doc_indices) - 1,
                bin_bytes=n_tok * 2,
                idx_bytes=len(idx_bytes),
                bin_sha256="0" * 64,
                idx_sha256="0" * 64,
            )
        )
        total_tokens += n_tok
        total_docs += len(doc_indices) - 1
        del lengths, idx_bytes
    write_manifest(
        out,
        Manifest(
            tokenizer_sha256="0" * 64,
            vocab_size=50265,
            special_ids={"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4},
            dtype="uint16",
            shards=tuple(infos),
        ),
    )
    return {"tokens": total_tokens, "sentences": sentences, "documents": total_docs}
