"""The quickstart's fill-mask example: held-out sentences, one whole word masked, the export's top 5.

Sentences come from the validation split (never trained on), chosen by their form alone, before the
model is asked anything: prose sentences (a capital first, a full stop last, only letters, spaces and
punctuation between) of 8-24 tokens, spread evenly over the split; in each, the whole-word token (a
word of 3+ letters that the next token does not continue) nearest the middle is masked. So the
examples cannot be picked to flatter the model, and a model that ignores context would answer every
sentence alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from roberta_ds.data.shard_set import open_shards

MIN_TOKENS, MAX_TOKENS = 8, 24
PROSE = re.compile(r"[A-Z][A-Za-z ,;:'-]*[a-z][.]")
"""A sentence of words: no code, numbers or markup."""
WORD_START = "\u0120"  # byte-level BPE's mark of a leading space
ENDS_WORD = frozenset(".,;:!?'\"")


@dataclass(frozen=True)
class Example:
    text: str
    """The sentence with `<mask>` in place of one word."""
    answer: str
    """The masked word."""


def _whole_words(tokens: list[str]) -> list[int]:
    """Positions of tokens that are a whole word of 3+ letters (a leading space, nothing glued after)."""
    out = []
    for i in range(1, len(tokens)):
        word = tokens[i][1:] if tokens[i].startswith(WORD_START) else ""
        follows = tokens[i + 1] if i + 1 < len(tokens) else WORD_START
        if len(word) >= 3 and word.isalpha() and (follows[0] == WORD_START or follows[0] in ENDS_WORD):
            out.append(i)
    return out


def validation_examples(valid_dir: Path, tokenizer_dir: Path, count: int = 4) -> list[Example]:
    """`count` examples from the validation split (fewer when it has fewer usable sentences)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    candidates: list[tuple[list[int], int]] = []
    _, readers = open_shards(valid_dir)
    for reader in readers:
        for seq in reader:
            ids = [int(i) for i in seq]
            if not MIN_TOKENS <= len(ids) <= MAX_TOKENS:
                continue
            if not PROSE.fullmatch(tok.decode(ids).strip()):
                continue
            words = _whole_words([tok.id_to_token(i) for i in ids])
            if words:
                candidates.append((ids, min(words, key=lambda i: abs(i - len(ids) / 2))))
    picks = [candidates[(2 * k + 1) * len(candidates) // (2 * count)] for k in range(count)] if candidates else []
    examples = []
    for ids, pos in picks:
        text = (tok.decode(ids[:pos]).strip() + " <mask>" + tok.decode(ids[pos + 1:]).rstrip()).strip()
        examples.append(Example(text=text, answer=tok.decode([ids[pos]]).strip()))
    return list(dict.fromkeys(examples))  # a split with fewer candidates than `count` repeats none


def fill_mask(hf_dir: Path, examples: list[Example], top_k: int = 5) -> list[list[tuple[str, float]]]:
    """The export's top-k (token, probability) for each example, through `transformers.pipeline`."""
    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(hf_dir), tokenizer=str(hf_dir), device=-1)
    return [[(p["token_str"].strip(), float(p["score"])) for p in fill(e.text, top_k=top_k)] for e in examples]


def format_example(example: Example, predictions: list[tuple[str, float]]) -> str:
    """Two lines: the sentence (and the held-out word), then the predictions with their probabilities."""
    hit = next((k + 1 for k, (w, _) in enumerate(predictions) if w == example.answer), None)
    where = f"#{hit} of the model's top {len(predictions)}" if hit else f"not in the top {len(predictions)}"
    return (f"{example.text}\n    held-out word {example.answer!r} ({where}): "
            + ", ".join(f"{w!r} ({p:.2f})" for w, p in predictions))
