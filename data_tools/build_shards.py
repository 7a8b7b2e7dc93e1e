"""Tokenize text / JSONL / .gz files into a train and a validation shard set.

    roberta-ds build-shards --tokenizer tok/ --out data/ corpus/*.jsonl.gz [--workers 8]
        -> data/train/{manifest.json, shard-00000.bin, shard-00000.idx, ...}
           data/valid/{manifest.json, shard-00000.bin, ...}
           data/build.json          (the settings, for resuming)

Each document (see data_tools.text_input) goes to `valid` when a hash of (seed, its text) falls
below `valid_fraction`, else to `train`: deterministic, independent of the worker count, and
duplicates land on the same side. A document is stored as its sentences/lines
(see data_tools.encode: the document's own encoding without <s>/</s>, cut at sentence ends), so
training can pack FULL-SENTENCES or DOC-SENTENCES blocks of any length later without
re-tokenizing.

Pipeline: this process reads documents, decides their split and groups them into chunks of about
CHUNK_BYTES of text; a pool of `workers` processes (spawned, each with cores/workers tokenizer
threads) encodes each chunk (`encode_documents`) and packs the ids into numpy arrays; this
process writes the results in chunk order. At most 2 x workers + 2 chunks are in flight, so
memory stays bounded whatever the corpus size. A shard is closed after the document that brings
it to `shard_tokens`; shard boundaries therefore depend only on the documents, and the output is
byte-identical for any number of workers.

Every shard is written under a temp name and renamed when complete; the manifests are written
last. A rerun with the same settings keeps the finished shards, skips their documents without
tokenizing them, and completes the build; the result is identical to an uninterrupted build.
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.encode import Part, encode_documents, token_byte_lengths
from data_tools.text_input import ReadStats, iter_documents_utf8, resolve_inputs
from roberta_ds.data.shard_set import Manifest, ShardInfo, open_shards, shard_info, write_manifest
from roberta_ds.data.shards import MANIFEST_NAME, ShardReader, ShardWriter, idx_path, token_dtype
from roberta_ds.data.tokenizer import TokenizerInfo, load_tokenizer_info
from roberta_ds.data.unigram import with_token_stats
from roberta_ds.durable import atomic_write_bytes
from roberta_ds.errors import UserError

DEFAULT_SHARD_TOKENS = 1 << 27
"""134M tokens: a 256 MiB .bin with uint16 ids."""
DEFAULT_VALID_FRACTION = 0.01
CHUNK_BYTES = 1 << 19
"""Text per pool task: big enough for encode_batch to pay off, small enough to balance workers."""
BUILD_STATE = "build.json"
SPAWN_HINT = (
    "workers are spawned processes that import the main module, so a script must call build_shards "
    "under `if __name__ == '__main__':`"
)
SPLITS = ("train", "valid")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def is_valid_document(text: str | bytes, seed: int, valid_fraction: float) -> bool:
    """Whether a document goes to the validation set: blake2b(UTF-8 text, salt=seed) / 2**64 < fraction."""
    if valid_fraction <= 0:
        return False
    data = text.encode("utf-8") if isinstance(text, str) else text
    h = hashlib.blake2b(data, digest_size=8, salt=seed.to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest(), "little") < valid_fraction * 2.0**64


# ----------------------------------------------------------------------------------------------
# Worker side: encode a chunk of documents


_worker: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, sha256: str, dtype: str, vocab_size: int, threads: int) -> None:
    # The tokenizers thread pool reads these when it starts (on first use), so set them first.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["RAYON_RS_NUM_CPUS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    from tokenizers import Tokenizer

    # The path, not the JSON, travels to the worker: CPython's spawn blocks forever writing a large
    # start-up payload to a child that died while starting.
    data = Path(tokenizer_path).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        _worker["error"] = f"{tokenizer_path}: changed while build-shards was running; rerun"
        return
    tok = Tokenizer.from_str(data.decode("utf-8"))
    _worker.update(
        tokenizer=tok, dtype=np.dtype(dtype), vocab_size=vocab_size, byte_lengths=token_byte_lengths(tok)
    )


def _split_part(part: Part, valid: np.ndarray) -> tuple[Part | None, Part | None]:
    """Separate a Part into its train and valid documents, order kept."""
    tokens, lengths, per_doc = part
    if not valid.any():
        return part, None
    if valid.all():
        return None, part
    seq_valid = np.repeat(valid, per_doc)
    tok_valid = np.repeat(seq_valid, lengths)
    train = (tokens[~tok_valid], lengths[~seq_valid], per_doc[~valid])
    return train, (tokens[tok_valid], lengths[seq_valid], per_doc[valid])


def _encode_chunk(texts: list[str], valid: np.ndarray) -> tuple[Part | None, Part | None]:
    w = _worker
    if "error" in w:
        raise UserError(w["error"])
    part = encode_documents(w["tokenizer"], texts, w["dtype"], w["vocab_size"], w["byte_lengths"])
    return _split_part(part, valid)


# ----------------------------------------------------------------------------------------------
# Writer side: one shard set per split


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


class SplitWriter:
    """Writes one shard set's shards in order, closing a shard after the document that fills it.

    On construction it adopts the finished shards already in `directory` (a resumed build):
    `resumed_documents` of the split's documents are in them and must not be written again.
    """

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory = directory
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.finished: list[ShardInfo] = []
        self.resumed_documents = 0
        self._writer: ShardWriter | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self._adopt_finished()

    def _adopt_finished(self) -> None:
        for tmp in self.directory.glob("*.tmp"):  # a killed writer's leftovers
            tmp.unlink()
        i = 0
        while idx_path(self.directory / shard_name(i)).is_file():
            prefix = self.directory / shard_name(i)
            reader = ShardReader(prefix)  # checks header and exact sizes
            if reader.dtype != self.dtype:
                raise UserError(f"{idx_path(prefix)}: dtype {reader.dtype}, this build writes {self.dtype}")
            self.finished.append(shard_info(prefix))
            self.resumed_documents += reader.num_documents
            i += 1
        # Anything after the finished prefix is from a killed run (a .bin renamed before its .idx).
        for p in sorted(self.directory.glob("shard-*")):
            number = p.stem.removeprefix("shard-")
            if p.suffix in (".bin", ".idx") and number.isdigit() and int(number) >= i:
                p.unlink()

    def write(self, part: Part) -> None:
        tokens, lengths, per_doc = part
        doc_tokens = (
            np.add.reduceat(lengths, np.concatenate(([0], np.cumsum(per_doc)[:-1])))
            if per_doc.size
            else per_doc
        )
        tok_start = seq_start = doc_start = 0
        while doc_start < per_doc.size:
            if self._writer is None:
                self._writer = ShardWriter(self.directory / shard_name(len(self.finished)), self.dtype)
            room = self.shard_tokens - self._writer.tokens
            cum = np.cumsum(doc_tokens[doc_start:])
            k = int(np.searchsorted(cum, room, side="left"))  # first document that fills the shard
            full = k < cum.size
            n_docs = k + 1 if full else cum.size
            n_seqs = int(per_doc[doc_start : doc_start + n_docs].sum())
            n_toks = int(cum[n_docs - 1])
            self._writer.add_documents(
                tokens[tok_start : tok_start + n_toks],
                lengths[seq_start : seq_start + n_seqs],
                per_doc[doc_start : doc_start + n_docs],
            )
            doc_start, seq_start, tok_start = doc_start + n_docs, seq_start + n_seqs, tok_start + n_toks
            if full:
                self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is None:
            raise RuntimeError("internal: no open shard to close")
        stats = self._writer.close()
        self.finished.append(shard_info(self._writer.prefix, stats))
        self._writer = None

    def finish(self) -> list[ShardInfo]:
        if self._writer is not None:
            self._close_shard()
        return self.finished

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


# ----------------------------------------------------------------------------------------------
# Progress


class Progress:
    """One status line on stderr: text MB, MB/s, tokens/s, documents (a line every 10 s off a tty)."""

    def __init__(self, enabled: bool, files: int) -> None:
        self.enabled = enabled
        self.files = files
        self.start = self._last = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.text_bytes = self.tokens = self.documents = 0

    def update(
        self, text_bytes: int, tokens: int, documents: int, file_index: int, final: bool = False
    ) -> None:
        self.text_bytes += text_bytes
        self.tokens += tokens
        self.documents += documents
        now = time.perf_counter()
        if not self.enabled or (not final and now - self._last < (0.5 if self.tty else 10.0)):
            return
        self._last = now
        dt = max(now - self.start, 1e-9)
        line = (
            f"build-shards: {self.text_bytes / 1e6:,.1f} MB text, {self.text_bytes / 1e6 / dt:,.2f} MB/s, "
            f"{self.tokens / dt / 1e3:,.0f}K tokens/s, {self.documents:,} docs, file {file_index}/{self.files}"
        )
        print(
            ("\r" + line) if self.tty else line,
            end="\n" if final or not self.tty else "",
            file=sys.stderr,
            flush=True,
        )


# ----------------------------------------------------------------------------------------------
# The build


class NoDocumentsError(UserError):
    """The inputs hold no usable (non-blank) document."""


def build_settings(
    files: list[Path],
    tok: TokenizerInfo,
    valid_fraction: float,
    shard_tokens: int,
    text_field: str,
    on_decode_error: str,
    seed: int,
) -> dict[str, Any]:
    """Everything the output depends on (and nothing it does not, e.g. the worker count)."""
    return {
        "inputs": [str(f.resolve()) for f in files],
        "input_bytes": [f.stat().st_size for f in files],
        "tokenizer": str(tok.path.resolve()),
        "tokenizer_sha256": tok.sha256,
        "valid_fraction": valid_fraction,
        "shard_tokens": shard_tokens,
        "text_field": text_field,
        "on_decode_error": on_decode_error,
        "seed": seed,
        "split_rule": "valid iff blake2b(utf8 text, salt=seed) < valid_fraction * 2**64",
        "sequence_rule": "document encoded whole, cut at split_sequences ends (data_tools.encode)",
    }


def prepare_output(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Create `out` or check that it holds a build with the same settings (to resume it)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file; give a directory")
    state = out / BUILD_STATE
    ours = [out / s for s in SPLITS]
    if state.is_file():
        try:
            previous = json.loads(state.read_text())
        except ValueError:
            previous = None
        if previous != settings:
            if not overwrite:
                diff = sorted(
                    k for k in settings if not isinstance(previous, dict) or previous.get(k) != settings[k]
                )
                raise UserError(
                    f"{out}: holds a build with other settings (differs in {diff}); pass --overwrite to "
                    "replace it or choose another --out"
                )
            _remove_build(out)
    elif any(d.exists() and any(d.iterdir()) for d in ours):
        if not overwrite:
            raise UserError(
                f"{out}: train/ or valid/ exist but {BUILD_STATE} does not; pass --overwrite or another --out"
            )
        _remove_build(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(state, (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())


def _remove_build(out: Path) -> None:
    """Delete a previous build's files (only names this tool writes)."""
    for split in SPLITS:
        d = out / split
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if (
                p.name == MANIFEST_NAME
                or p.name.startswith("shard-")
                or p.name.startswith(f".{MANIFEST_NAME}")
            ):
                p.unlink()
    (out / BUILD_STATE).unlink(missing_ok=True)


def already_complete(out: Path, settings: dict[str, Any]) -> dict[str, Manifest] | None:
    if not all((out / s / MANIFEST_NAME).is_file() for s in SPLITS):
        return None
    manifests = {}
    for s in SPLITS:
        manifest, _ = open_shards(out / s)  # checks files exist with the recorded sizes
        if manifest.tokenizer_sha256 != settings["tokenizer_sha256"]:
            return None
        manifests[s] = manifest
    return manifests


def split_manifest(
    split: str, tok: TokenizerInfo, shards: Sequence[ShardInfo], settings: dict[str, Any], stats: ReadStats
) -> Manifest:
    """The manifest of one split of a build: no timestamps or worker counts, so reruns match bytes."""
    return Manifest(
        tokenizer_sha256=tok.sha256,
        vocab_size=tok.vocab_size,
        special_ids=dict(tok.special_ids),
        dtype=token_dtype(tok.vocab_size).name,
        shards=tuple(shards),
        created_by={
            "command": "roberta-ds build-shards",
            "split": split,
            **{k: v for k, v in settings.items() if k != "input_bytes"},
            "documents_read": stats.documents,
            "documents_skipped_empty": stats.skipped_empty,
            "decode_replacements": stats.replacements,
        },
    )


def build_shards(
    inputs: Sequence[str | Path],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    workers: int = 1,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    text_field: str = "text",
    on_decode_error: str = "strict",
    seed: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Manifest]:
    """Tokenize `inputs` into `<out_dir>/train` and `<out_dir>/valid`; returns their manifests.

    Workers are spawned processes: from a script, call this under `if __name__ == "__main__":`.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # We are a spawned worker re-running a script that calls build_shards at import time.
        raise UserError(f"build_shards was called while a worker process started: {SPAWN_HINT}")
    if workers < 1:
        raise UserError(f"--workers: must be >= 1, got {workers}")
    if not 0 <= valid_fraction < 1:
        raise UserError(f"--valid-fraction: must be in [0, 1), got {valid_fraction}")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens: must be >= 1, got {shard_tokens}")
    tok = load_tokenizer_info(tokenizer_dir)
    dtype = token_dtype(tok.vocab_size)
    files = resolve_inputs(inputs)
    out = Path(out_dir)
    settings = build_settings(files, tok, valid_fraction, shard_tokens, text_field, on_decode_error, seed)
    prepare_output(out, settings, overwrite)
    done = already_complete(out, settings)
    if done is not None:
        if progress:
            print(f"build-shards: {out} is already complete", file=sys.stderr)
        return done

    writers = {s: SplitWriter(out / s, dtype, shard_tokens) for s in SPLITS}
    stats = ReadStats()
    docs = iter_documents_utf8(files, text_field=text_field, on_decode_error=on_decode_error, stats=stats)
    split_of = functools.partial(_split_of, seed=seed, valid_fraction=valid_fraction)
    seen = _encode_into(writers, docs, split_of, tok, dtype, workers, Progress(progress, len(files)), stats)

    if stats.documents == 0:
        _remove_build(out)  # nothing was written; leave no state that looks like a build
        for split in SPLITS:
            if (out / split).is_dir() and not any((out / split).iterdir()):
                (out / split).rmdir()
        raise NoDocumentsError(
            f"no usable documents in {len(files)} input file(s): {stats.skipped_empty} empty or whitespace-only "
            f"documents skipped" + (f" (JSONL field {text_field!r})" if text_field != "text" else "")
        )
    for split in SPLITS:
        if seen[split] < writers[split].resumed_documents:
            raise UserError(
                f"{out / split}: holds more documents than the inputs give; rerun with --overwrite"
            )
    infos = {s: w.finish() for s, w in writers.items()}
    if not infos["valid"] and valid_fraction > 0:
        print(
            f"build-shards: warning: no document fell in the validation split (valid_fraction "
            f"{valid_fraction} of {stats.documents} documents); {out / 'valid'} is empty",
            file=sys.stderr,
        )
    manifests = {}
    for split in SPLITS:
        manifests[split] = with_token_stats(out / split, split_manifest(split, tok, infos[split], settings, stats))
        write_manifest(out / split, manifests[split])
    return manifests


def _split_of(data: bytes, *, seed: int, valid_fraction: float) -> str:
    return "valid" if is_valid_document(data, seed, valid_fraction) else "train"


def _encode_into(writers: dict[str, SplitWriter], docs: Iterator[tuple[str, bytes]], split_of: Callable[[bytes], str],
                 tok: TokenizerInfo, dtype: np.dtype, workers: int, bar: Progress, stats: ReadStats) -> dict[str, int]:
    """Encode `docs` in `workers` processes, in chunks of CHUNK_BYTES, into the splits' writers, in input
    order; documents already in a resumed build's finished shards are skipped. Returns the documents
    seen per split. On any failure the writers are aborted (nothing half-written looks finished)."""
    threads = max(1, usable_cores() // workers)
    # Spawned, not forked: a fork would inherit the tokenizers thread pool in an unusable state.
    # An executor (not multiprocessing.Pool) so that workers dying at start-up fail the build
    # instead of being respawned forever.
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(str(tok.path), tok.sha256, dtype.str, tok.vocab_size, threads),
    )
    in_flight: collections.deque = collections.deque()
    max_in_flight = 2 * workers + 2

    def drain(limit: int) -> None:
        while len(in_flight) > limit:
            future, nbytes = in_flight.popleft()
            train, valid = future.result()
            docs = toks = 0
            for split, part in (("train", train), ("valid", valid)):
                if part is not None:
                    writers[split].write(part)
                    docs += part[2].size
                    toks += part[0].size
            bar.update(nbytes, toks, docs, stats.files)

    seen = dict.fromkeys(SPLITS, 0)
    try:
        texts: list[str] = []
        flags: list[bool] = []
        chunk_bytes = 0
        for text, data in docs:
            split = split_of(data)
            seen[split] += 1
            if seen[split] <= writers[split].resumed_documents:
                continue  # already in a finished shard
            texts.append(text)
            flags.append(split == "valid")
            chunk_bytes += len(data)
            if chunk_bytes >= CHUNK_BYTES:
                in_flight.append((pool.submit(_encode_chunk, texts, np.array(flags)), chunk_bytes))
                texts, flags, chunk_bytes = [], [], 0
                drain(max_in_flight)
        if texts:
            in_flight.append((pool.submit(_encode_chunk, texts, np.array(flags)), chunk_bytes))
        drain(0)
    except BrokenProcessPool:
        for w in writers.values():
            w.abort()
        pool.shutdown(wait=False, cancel_futures=True)
        raise UserError(
            f"a build-shards worker process died (out of memory or killed?); {SPAWN_HINT}"
        ) from None
    except BaseException:
        for w in writers.values():
            w.abort()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    bar.update(0, 0, 0, stats.files, final=True)
    return seen


def set_summary(split_dir: Path, m: Manifest) -> str:
    """One line per written shard set, as the build commands print it."""
    return (f"{split_dir}: {len(m.shards)} shard(s), {m.documents:,} documents, "
            f"{m.sequences:,} sequences, {m.tokens:,} tokens ({m.dtype})")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="roberta-ds build-shards",
        description="Tokenize text/JSONL/.gz files into train/ and valid/ shard sets (.bin/.idx + manifest.json).",
    )
    p.add_argument("inputs", nargs="+", help="input files or directories (txt, jsonl, .gz of either)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or tokenizer.json")
    p.add_argument("--out", required=True, help="output directory (gets train/, valid/, build.json)")
    p.add_argument(
        "--workers", type=int, default=usable_cores(), help="tokenizing processes (default: cores)"
    )
    p.add_argument(
        "--valid-fraction",
        type=float,
        default=DEFAULT_VALID_FRACTION,
        help="fraction of documents for validation, chosen by a hash of the text (default 0.01)",
    )
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="target tokens per shard")
    p.add_argument("--text-field", default="text", help="JSONL field holding the document (default: text)")
    p.add_argument(
        "--on-decode-error",
        choices=("strict", "replace"),
        default="strict",
        help="non-UTF-8 bytes: fail (strict) or substitute U+FFFD and count (replace)",
    )
    p.add_argument("--seed", type=int, default=1, help="seeds the train/valid split")
    p.add_argument("--overwrite", action="store_true", help="replace a previous build with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    manifests = build_shards(
        args.inputs,
        args.tokenizer,
        args.out,
        workers=args.workers,
        valid_fraction=args.valid_fraction,
        shard_tokens=args.shard_tokens,
        text_field=args.text_field,
        on_decode_error=args.on_decode_error,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    for split, m in manifests.items():
        print(set_summary(Path(args.out) / split, m))
    created = manifests["train"].created_by
    print(
        f"skipped {created['documents_skipped_empty']} empty documents, {created['decode_replacements']} "
        f"undecodable byte sequences replaced; {time.perf_counter() - t0:.1f} s"
    )
    return 0
