"""What the rest of the system needs to know about a tokenizer: identity, size, special ids, word starts.

A tokenizer is a directory holding `tokenizer.json` (the Hugging Face `tokenizers` format; written
by `roberta-ds tokenizer`) or that file itself. Its identity is the sha256 of `tokenizer.json`'s
bytes: shard manifests and checkpoints record it, and readers refuse a mismatch.

    info = load_tokenizer_info("tok/")          # TokenizerInfo(path, sha256, vocab_size, special_ids)
    table = word_start_table("tok/")            # bool [vocab_size], for whole-word masking
    decode("tok/", [0, 713, 16, 2])             # "<s>This is</s>"
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from roberta_ds.durable import file_sha256
from roberta_ds.errors import UserError

SPECIAL_TOKENS: dict[str, str] = {
    "bos": "<s>",
    "pad": "<pad>",
    "eos": "</s>",
    "unk": "<unk>",
    "mask": "<mask>",
}
"""Role -> token string; RoBERTa's (and our trained tokenizers') ids are <s>=0 <pad>=1 </s>=2 <unk>=3."""
TOKENIZER_FILE = "tokenizer.json"
# Byte-level BPE maps the bytes ' ', '\n', '\t', '\r' to these printable characters.
BYTE_LEVEL_WHITESPACE = ("\u0120", "\u010a", "\u0109", "\u010d")  # Ġ Ċ ĉ č


@dataclass(frozen=True)
class TokenizerInfo:
    path: Path
    """The tokenizer.json file."""
    sha256: str
    """sha256 of tokenizer.json's bytes: the tokenizer's fingerprint in manifests and checkpoints."""
    vocab_size: int
    """Number of ids, added tokens included: every id the tokenizer emits is below it."""
    special_ids: dict[str, int]
    """Keys bos, pad, eos, unk, mask."""


def tokenizer_file(path: str | os.PathLike) -> Path:
    """The tokenizer.json of `path` (a directory or the file itself); errors when there is none."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise UserError(
            f"{p}: tokenizer.json not found; pass a directory made by `roberta-ds tokenizer` "
            "or a tokenizer.json file"
        )
    return p


def _load(path: Path):
    from tokenizers import Tokenizer  # deferred: importing this module must stay cheap

    try:
        return Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as e:  # tokenizers raises plain Exception for a malformed file
        raise UserError(f"{path}: not a valid tokenizer.json ({e})") from None


@functools.lru_cache(maxsize=8)
def _cached(path: str, mtime_ns: int, size: int):
    # Keyed by modification time and size too, so a tokenizer rewritten in place is reloaded.
    return _load(Path(path))


def load_tokenizer(path: str | os.PathLike):
    """A `tokenizers.Tokenizer` for `path` (cached per file and modification)."""
    p = tokenizer_file(path)
    st = p.stat()
    return _cached(str(p.resolve()), st.st_mtime_ns, st.st_size)


def special_ids_of(tok, where: str | os.PathLike) -> dict[str, int]:
    """Role -> id of RoBERTa's five special tokens; errors naming any that is missing."""
    ids = {role: tok.token_to_id(token) for role, token in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[r] for r, i in ids.items() if i is None]
    if missing:
        raise UserError(
            f"{where}: the tokenizer lacks the special token(s) {missing}; a RoBERTa tokenizer needs "
            f"{list(SPECIAL_TOKENS.values())} (train one with `roberta-ds tokenizer`)"
        )
    return {r: int(i) for r, i in ids.items()}


def load_tokenizer_info(path: str | os.PathLike) -> TokenizerInfo:
    """Fingerprint, vocabulary size and special ids of the tokenizer at `path` (dir or tokenizer.json)."""
    p = tokenizer_file(path)
    tok = _load(p)
    return TokenizerInfo(
        path=p,
        sha256=file_sha256(p),
        vocab_size=int(tok.get_vocab_size(with_added_tokens=True)),
        special_ids=special_ids_of(tok, p),
    )


def word_start_table(path: str | os.PathLike) -> np.ndarray:
    """bool [vocab_size]: True for ids whose token begins a word, for whole-word masking.

    In byte-level BPE a word carries its leading space, so a token starting with 'Ġ' (the byte-level
    space) begins a word; so do tokens starting with the byte-level newline, tab or carriage return
    (whitespace ends the previous word) and the special tokens. A token that is the first of a
    sequence without a leading space (e.g. after a newline) is not marked: callers should also
    treat the first token of each sequence as a word start.
    """
    tok = load_tokenizer(path)
    vocab = tok.get_vocab(with_added_tokens=True)
    table = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=bool)
    for token, i in vocab.items():
        if token.startswith(BYTE_LEVEL_WHITESPACE):
            table[i] = True
    for token in SPECIAL_TOKENS.values():
        i = tok.token_to_id(token)
        if i is not None:
            table[i] = True
    return table


def decode(path: str | os.PathLike, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids` under the tokenizer at `path`, special tokens kept (so `<s>`/`</s>` show)."""
    tok = load_tokenizer(path)
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def tokenizer_vocab_size(tokenizer_dir: str | Path) -> int:
    """The vocabulary size of a tokenizer directory: a model's default `vocab_size` (config's
    `vocab_size_of`, which setup passes: config sits below data/ and does not import this module)."""
    return load_tokenizer_info(tokenizer_dir).vocab_size
