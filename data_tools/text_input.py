"""Streaming text input: documents from .txt / .jsonl files (optionally .gz), and their sentences.

Formats, chosen by file name (a trailing `.gz` is decompressed on the fly):
  * `.jsonl`, `.json`, `.ndjson`: one JSON object per line, the document in field `text`
    (`text_field`); blank lines are ignored.
  * anything else is plain text: documents are separated by blank (or whitespace-only) lines and
    each non-empty line is a sentence; a document's text is its lines with their line ends.

Files are read line by line in binary and decoded here, so a corpus is never held in memory and a
bad byte or bad JSON is reported with its file and line. `on_decode_error="strict"` (default)
refuses non-UTF-8 bytes; `"replace"` substitutes U+FFFD and counts the replacements.
Empty and whitespace-only documents are skipped and counted.

`split_sequences(text)` cuts a document into the sequences stored in shards: after every line end
and after sentence-ending punctuation followed by a space and a capital. Concatenating the pieces
gives the text back exactly (the separator stays with the sequence it ends; the space before a new
sentence stays with it, where byte-level BPE puts it).
"""

from __future__ import annotations

import codecs
import gzip
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from roberta_ds.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
DECODE_ERROR_MODES = ("strict", "replace")

# A separator ends the sequence before it: a run of newlines (when text follows), or . ! ? with an
# optional closing quote/bracket when blanks and a capital letter, digit or opening quote follow
# (the blanks stay with the next sentence, where byte-level BPE puts them). The pattern opens with
# a character class so the regex engine can skip ahead quickly (3x faster than lookbehind splits).
_SEPARATOR = re.compile(r"([\n.!?](?:(?<=\n)\n*(?=[^\n])|(?<=[.!?])[\"')\]]?(?=[ \t]+[\"'(\[]?[A-Z0-9])))")


def split_sequences(text: str) -> list[str]:
    """Sentences/lines of `text`, none empty or whitespace-only; `"".join(result) == text`.

    A whitespace-only piece (a line of blanks) is joined to the piece after it (or, at the end, to
    the one before), so every sequence has visible text. `text` must hold a non-blank character.
    """
    parts = _SEPARATOR.split(text)  # [piece, separator, piece, separator, ..., piece]
    pieces = [a + b for a, b in zip(parts[::2], parts[1::2])]
    if parts[-1]:
        pieces.append(parts[-1])
    if not any(map(str.isspace, pieces)):
        return pieces
    out: list[str] = []
    pending = ""
    for p in pieces:
        if p.isspace():
            pending += p
        else:
            out.append(pending + p)
            pending = ""
    if pending:
        out[-1] += pending
    return out


@dataclass
class ReadStats:
    """What reading the inputs saw (updated as documents stream out)."""

    files: int = 0
    documents: int = 0
    """Documents yielded (non-blank)."""
    skipped_empty: int = 0
    """Empty or whitespace-only documents skipped."""
    replacements: int = 0
    """Undecodable byte sequences replaced by U+FFFD (on_decode_error='replace')."""
    text_bytes: int = 0
    """UTF-8 bytes of the yielded documents' text."""


def input_format(path: Path) -> str:
    """'jsonl' or 'txt', from the file name (a `.gz` suffix is looked through)."""
    name = path.name.removesuffix(".gz")
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else "txt"


def resolve_inputs(inputs: Sequence[str | Path], recursive: bool = False) -> list[Path]:
    """Input files in order; a directory stands for its files (sorted, no dotfiles; with `recursive`,
    those of its subdirectories too, in sorted path order, skipping dot-directories)."""
    if not inputs:
        raise UserError("no input files given")
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = p.rglob("*") if recursive else p.iterdir()
            inside = sorted(f for f in found if f.is_file() and not any(
                part.startswith(".") for part in f.relative_to(p).parts))
            if not inside:
                raise UserError(f"{p}: input directory holds no files")
            files += inside
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p}: input file not found")
    for f in files:
        if f.stat().st_size == 0:
            raise UserError(f"{f}: input file is empty (remove it from the inputs)")
    return files


def _open(path: Path) -> BinaryIO:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


class _Decoder:
    """Bytes -> str with the chosen error policy; names file and line on failure."""

    def __init__(self, on_decode_error: str, stats: ReadStats) -> None:
        if on_decode_error not in DECODE_ERROR_MODES:
            raise UserError(
                f"--on-decode-error: must be one of {DECODE_ERROR_MODES}, got {on_decode_error!r}"
            )
        self.mode = on_decode_error
        self.stats = stats

    def __call__(self, raw: bytes, path: Path, lineno: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.mode == "strict":
                raise UserError(
                    f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                    "fix the file or pass --on-decode-error=replace"
                ) from None
        text = raw.decode("utf-8", errors="replace")
        # Each undecodable sequence became one U+FFFD; do not count the ones the file really holds.
        self.stats.replacements += text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")
        return text

    def surrogates(self, text: str, path: Path, lineno: int) -> str:
        """Refuse (or replace) unpaired surrogates, which JSON escapes like \\ud800 can smuggle in."""
        if self.mode == "strict":
            raise UserError(
                f"{path}:{lineno}: text holds an unpaired surrogate escape (e.g. \\ud800), which is not "
                "text; fix the file or pass --on-decode-error=replace"
            )
        fixed = "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)
        self.stats.replacements += sum(1 for ch in text if "\ud800" <= ch <= "\udfff")
        return fixed


def _jsonl_documents(path: Path, text_field: str, decoder: _Decoder) -> Iterator[tuple[str, int]]:
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line = decoder(raw, path, lineno)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            if text_field not in obj:
                raise UserError(
                    f"{path}:{lineno}: no field {text_field!r} (fields: {sorted(obj)[:8]}); "
                    "choose the field with --text-field"
                )
            text = obj[text_field]
            if not isinstance(text, str):
                raise UserError(
                    f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string"
                )
            yield text, lineno


def _txt_documents(path: Path, decoder: _Decoder) -> Iterator[tuple[str, int]]:
    lines: list[str] = []
    start = 0
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            if raw.strip():
                if not lines:
                    start = lineno
                lines.append(decoder(raw, path, lineno))
            elif lines:
                yield "".join(lines), start
                lines = []
    if lines:
        yield "".join(lines), start


def iter_documents(
    paths: Sequence[Path],
    *,
    text_field: str = "text",
    on_decode_error: str = "strict",
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """Every non-blank document of `paths`, in order, streamed; counts go into `stats`."""
    for text, _ in iter_documents_utf8(
        paths, text_field=text_field, on_decode_error=on_decode_error, stats=stats
    ):
        yield text


def iter_documents_utf8(
    paths: Sequence[Path],
    *,
    text_field: str = "text",
    on_decode_error: str = "strict",
    stats: ReadStats | None = None,
) -> Iterator[tuple[str, bytes]]:
    """Like `iter_documents`, with each document's UTF-8 bytes (computed anyway, to count them)."""
    stats = stats if stats is not None else ReadStats()
    decoder = _Decoder(on_decode_error, stats)
    for path in paths:
        stats.files += 1
        if input_format(path) == "jsonl":
            docs = _jsonl_documents(path, text_field, decoder)
        else:
            docs = _txt_documents(path, decoder)
        try:
            for text, lineno in docs:
                if not text or text.isspace():
                    stats.skipped_empty += 1
                    continue
                try:
                    data = text.encode("utf-8")
                except UnicodeEncodeError:
                    text = decoder.surrogates(text, path, lineno)
                    data = text.encode("utf-8")
                stats.documents += 1
                stats.text_bytes += len(data)
                yield text, data
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise UserError(f"{path}: cannot read ({e})") from None
