"""Test support: write small shard sets (real ShardWriter + manifest) from nested token lists.

A corpus is shards -> documents -> sentences -> token ids. Special ids follow RoBERTa's
(<s>=0, <pad>=1, </s>=2, <unk>=3) with <mask> last, so ordinary tokens are 4 .. vocab_size - 2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from roberta_ds.data.shard_set import Manifest, shard_info, write_manifest
from roberta_ds.data.shards import ShardWriter, token_dtype

VOCAB = 1000
SPECIALS = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": VOCAB - 1}
FIRST_WORD, LAST_WORD = 4, VOCAB - 2

Corpus = list[list[list[list[int]]]]


def write_set(
    directory: str | Path,
    corpus: Corpus,
    *,
    vocab_size: int = VOCAB,
    tokenizer_sha256: str = "ab" * 32,
    specials: dict[str, int] | None = None,
) -> Path:
    """Write `corpus` as shard files `shard-<i>` plus manifest.json under `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    infos = []
    for i, docs in enumerate(corpus):
        prefix = directory / f"shard-{i:03d}"
        with ShardWriter(prefix, token_dtype(vocab_size)) as w:
            for doc in docs:
                for sent in doc:
                    w.add_sequence(np.asarray(sent, dtype=np.int64))
                w.end_document()
        infos.append(shard_info(prefix))
    write_manifest(
        directory,
        Manifest(
            tokenizer_sha256=tokenizer_sha256,
            vocab_size=vocab_size,
            special_ids=dict(specials or SPECIALS),
            dtype=str(token_dtype(vocab_size)),
            shards=tuple(infos),
        ),
    )
    return directory


def random_corpus(
    seed: int,
    *,
    shards: int = 2,
    docs: int = 20,
    max_sentences: int = 12,
    max_len: int = 40,
    long_every: int = 0,
    long_len: int = 0,
) -> Corpus:
    """Random documents; with long_every > 0 every long_every-th sentence has long_len tokens."""
    rng = np.random.default_rng(seed)
    out: Corpus = []
    count = 0
    for _ in range(shards):
        shard = []
        for _ in range(docs):
            doc = []
            for _ in range(int(rng.integers(1, max_sentences + 1))):
                count += 1
                n = long_len if long_every and count % long_every == 0 else int(rng.integers(1, max_len + 1))
                doc.append(rng.integers(FIRST_WORD, LAST_WORD + 1, size=n).tolist())
            shard.append(doc)
        out.append(shard)
    return out
