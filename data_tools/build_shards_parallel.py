"""`build-shards` split over N independent tasks (a SLURM job array), then merged: the same bytes.

    python -m data_tools.build_shards_parallel part  --task 3 --tasks 8 --tokenizer tok/ --out data/ corpus/
    python -m data_tools.build_shards_parallel merge --tasks 8 --tokenizer tok/ --out data/ corpus/
        -> data/{build.json, train/, valid/}: byte for byte what
           `roberta-ds build-shards --tokenizer tok/ --out data/ corpus/` writes

The inputs are resolved and ordered exactly as build-shards does. Task I of N takes a contiguous
range of those files, balanced by bytes (`task_ranges`), and runs build-shards on it into
`<out>/.parts/task-0000I/` (resumable like any build: a rerun keeps its finished shards), then
records itself done in `done.json`. Tokenizing, the expensive part, happens there.

`merge` reads the parts in task order (= build-shards' document order) and re-cuts the documents
into shards with build-shards' own writer (a shard closes after the document that brings it to
`shard_tokens`, so boundaries depend only on the documents), then writes `build.json` and the
manifests as build-shards does: nothing in the result says how many tasks made it. The merge
copies tokens without tokenizing; it resumes like a build (finished shards kept, their documents
skipped), refuses parts made from other inputs, settings or task counts, and deletes `.parts`
when done (`--keep-parts` keeps them). A later `roberta-ds build-shards` with the same inputs and
settings finds the output complete.

Granularity is the input file: split a corpus into at least as many files as tasks (tasks beyond
the file count get nothing to do).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_tools.build_shards import (
    DEFAULT_SHARD_TOKENS,
    DEFAULT_VALID_FRACTION,
    SPLITS,
    NoDocumentsError,
    SplitWriter,
    already_complete,
    build_settings,
    build_shards,
    prepare_output,
    set_summary,
    split_manifest,
    usable_cores,
)
from data_tools.encode import Part
from data_tools.text_input import ReadStats, iter_documents_utf8, resolve_inputs
from roberta_ds.data.shard_set import Manifest, open_shards, write_manifest
from roberta_ds.data.shards import token_dtype
from roberta_ds.data.tokenizer import load_tokenizer_info
from roberta_ds.data.unigram import with_token_stats
from roberta_ds.durable import atomic_write_bytes
from roberta_ds.errors import UserError

PARTS_DIR = ".parts"
DONE_NAME = "done.json"
COPY_TOKENS = 1 << 24
"""Tokens handed to the shard writer at a time while merging (32 MiB of uint16): bounds memory."""


@dataclass(frozen=True)
class BuildOptions:
    """The build-shards settings that shape the output (the worker count does not)."""

    valid_fraction: float = DEFAULT_VALID_FRACTION
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    text_field: str = "text"
    on_decode_error: str = "strict"
    seed: int = 1


def task_ranges(sizes: Sequence[int], tasks: int) -> list[tuple[int, int]]:
    """Split files (in order, with these byte sizes) into `tasks` contiguous [start, end) ranges.

    Boundary k sits at the file boundary whose byte prefix is nearest k/tasks of the total (ties:
    the earlier one), never before boundary k-1; exact integer arithmetic, so every task computes
    the same split. Ranges may be empty (fewer files than tasks, or one huge file).
    """
    if tasks < 1:
        raise UserError(f"--tasks: must be >= 1, got {tasks}")
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + int(s))
    total, n = prefix[-1], len(sizes)
    bounds = [0]
    for k in range(1, tasks):
        # |prefix[j] * tasks - total * k| is tasks times the distance to the target, in integers.
        j = min(range(n + 1), key=lambda j: (abs(prefix[j] * tasks - total * k), j))
        bounds.append(max(bounds[-1], j))
    bounds.append(n)
    return list(itertools.pairwise(bounds))


def part_dir(out: Path, task: int) -> Path:
    return out / PARTS_DIR / f"task-{task:05d}"


def _task_files(files: list[Path], task: int, tasks: int) -> list[Path]:
    if not 0 <= task < tasks:
        raise UserError(f"--task {task}: must be in [0, {tasks}) for --tasks {tasks}")
    start, end = task_ranges([f.stat().st_size for f in files], tasks)[task]
    return files[start:end]


def build_part(
    inputs: Sequence[str | Path],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    task: int,
    tasks: int,
    options: BuildOptions = BuildOptions(),
    workers: int = 1,
    progress: bool = False,
) -> dict:
    """Task `task` of `tasks`: build-shards on its range of the inputs; returns its done.json record."""
    files = resolve_inputs(inputs)
    mine = _task_files(files, task, tasks)
    dest = part_dir(Path(out_dir), task)
    done_path = dest / DONE_NAME
    record = {
        "task": task,
        "tasks": tasks,
        "files": [str(f.resolve()) for f in mine],
        "options": dataclasses.asdict(options),
    }
    if done_path.is_file():
        previous = json.loads(done_path.read_text())
        if {k: previous.get(k) for k in record} == record:
            return previous
        done_path.unlink()  # made from other inputs or settings: rebuilt below (overwrite=True)
    stats = {"documents_read": 0, "documents_skipped_empty": 0, "decode_replacements": 0}
    if mine:
        try:
            # overwrite: a part is scratch; one made from other inputs or settings is rebuilt.
            manifests = build_shards(
                mine,
                tokenizer_dir,
                dest,
                workers=workers,
                progress=progress,
                overwrite=True,
                **dataclasses.asdict(options),
            )
            created = manifests["train"].created_by
            stats = {k: int(created[k]) for k in stats}
        except NoDocumentsError:
            # Only blank documents in this range: nothing to store, but the counts still add up to
            # the single-machine build's.
            read = ReadStats()
            for _ in iter_documents_utf8(
                mine, text_field=options.text_field, on_decode_error=options.on_decode_error, stats=read
            ):
                pass
            stats = {
                "documents_read": read.documents,
                "documents_skipped_empty": read.skipped_empty,
                "decode_replacements": read.replacements,
            }
    record = {**record, **stats, "empty": not mine or stats["documents_read"] == 0}
    dest.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(done_path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return record


def _documents_of(parts: list[Path], split: str, dtype: np.dtype, sha256: str) -> Iterator[Part]:
    """The split's documents from every part, in order, as (tokens, sequence lengths, per-doc) pieces."""
    for part in parts:
        manifest, readers = open_shards(part / split)
        if manifest.tokenizer_sha256 != sha256 or np.dtype(manifest.dtype) != dtype:
            raise UserError(
                f"{part / split}: made with another tokenizer or token dtype than this merge's; "
                "rebuild the parts (delete them and rerun the tasks)"
            )
        for r in readers:
            per_doc = np.diff(np.asarray(r.document_indices, dtype=np.int64))  # (D,) sequences per document
            lengths = np.asarray(r.sequence_lengths, dtype=np.int64)  # (S,) tokens per sequence
            seq_end = np.cumsum(per_doc)  # (D,) sequences through doc d
            tok_end = np.concatenate(([0], np.cumsum(lengths)))[np.concatenate(([0], seq_end))]  # (D+1,)
            d = 0
            while d < per_doc.size:
                # Whole documents d..e-1, about COPY_TOKENS tokens (at least one document).
                e = max(
                    d + 1,
                    min(
                        int(np.searchsorted(tok_end, tok_end[d] + COPY_TOKENS, side="right")) - 1,
                        per_doc.size,
                    ),
                )
                s0, s1 = int(seq_end[d - 1]) if d else 0, int(seq_end[e - 1])
                yield r.read(int(tok_end[d]), int(tok_end[e] - tok_end[d])), lengths[s0:s1], per_doc[d:e]
                d = e


def _skip_documents(pieces: Iterator[Part], count: int) -> Iterator[Part]:
    """Drop the first `count` documents (already in the merge's finished shards)."""
    for tokens, lengths, per_doc in pieces:
        if count >= per_doc.size:
            count -= per_doc.size
            continue
        if count:
            seqs = int(per_doc[:count].sum())
            toks = int(lengths[:seqs].sum())
            tokens, lengths, per_doc = tokens[toks:], lengths[seqs:], per_doc[count:]
            count = 0
        yield tokens, lengths, per_doc


def merge_parts(
    inputs: Sequence[str | Path],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    tasks: int,
    options: BuildOptions = BuildOptions(),
    keep_parts: bool = False,
    progress: bool = False,
) -> dict[str, Manifest]:
    """Merge the `tasks` parts under `<out_dir>/.parts` into `<out_dir>`, as build-shards would write it."""
    out = Path(out_dir)
    tok = load_tokenizer_info(tokenizer_dir)
    dtype = token_dtype(tok.vocab_size)
    files = resolve_inputs(inputs)
    settings = build_settings(
        files,
        tok,
        options.valid_fraction,
        options.shard_tokens,
        options.text_field,
        options.on_decode_error,
        options.seed,
    )
    prepare_output(out, settings, overwrite=False)
    done = already_complete(out, settings)
    if done is not None:
        _remove_parts(out, keep_parts)
        return done

    records = []
    missing = []
    for task in range(tasks):
        path = part_dir(out, task) / DONE_NAME
        if not path.is_file():
            missing.append(task)
            continue
        rec = json.loads(path.read_text())
        want = [str(f.resolve()) for f in _task_files(files, task, tasks)]
        if (
            rec.get("tasks") != tasks
            or rec.get("files") != want
            or rec.get("options") != dataclasses.asdict(options)
        ):
            raise UserError(
                f"{path}: part made with other inputs, settings or task count (tasks "
                f"{rec.get('tasks')}, not {tasks}); rerun task {task} with this merge's arguments"
            )
        records.append(rec)
    if missing:
        shown = ",".join(map(str, missing[:20])) + (",..." if len(missing) > 20 else "")
        raise UserError(
            f"{out / PARTS_DIR}: {len(missing)} of {tasks} tasks have not finished (tasks {shown}); "
            f"run them (e.g. `sbatch --array={shown} slurm/preprocess.sbatch`), then merge again"
        )
    parts = [part_dir(out, r["task"]) for r in records if not r["empty"]]

    t0 = time.perf_counter()
    infos = {}
    for split in SPLITS:
        writer = SplitWriter(out / split, dtype, options.shard_tokens)
        try:
            for piece in _skip_documents(
                _documents_of(parts, split, dtype, tok.sha256), writer.resumed_documents
            ):
                writer.write(piece)
        except BaseException:
            writer.abort()
            raise
        infos[split] = writer.finish()
    documents_read = sum(r["documents_read"] for r in records)
    if documents_read == 0:
        raise NoDocumentsError(f"no usable documents in {len(files)} input file(s)")
    if not infos["valid"] and options.valid_fraction > 0:
        print(
            f"build-shards: warning: no document fell in the validation split (valid_fraction "
            f"{options.valid_fraction} of {documents_read} documents); {out / 'valid'} is empty",
            file=sys.stderr,
        )
    manifests = {}
    for split in SPLITS:
        counts = ReadStats(documents=documents_read,
                           skipped_empty=sum(r["documents_skipped_empty"] for r in records),
                           replacements=sum(r["decode_replacements"] for r in records))
        manifests[split] = with_token_stats(out / split, split_manifest(split, tok, infos[split], settings, counts))
        write_manifest(out / split, manifests[split])
    if progress:
        print(
            f"build-shards-parallel: merged {len(parts)} part(s) in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
    _remove_parts(out, keep_parts)
    return manifests


def _remove_parts(out: Path, keep: bool) -> None:
    if not keep and (out / PARTS_DIR).is_dir():
        shutil.rmtree(out / PARTS_DIR)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_tools.build_shards_parallel", description=__doc__.splitlines()[0]
    )
    sub = p.add_subparsers(dest="stage", required=True)
    for name, help_ in (
        ("part", "tokenize task I's range of the inputs into <out>/.parts/"),
        ("merge", "merge every task's part into <out> (train/, valid/, manifests)"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("inputs", nargs="+", help="the same inputs for every task and the merge")
        s.add_argument("--tokenizer", required=True, help="tokenizer directory or tokenizer.json")
        s.add_argument("--out", required=True, help="output directory (parts go to <out>/.parts)")
        s.add_argument("--tasks", type=int, required=True, help="number of tasks N")
        s.add_argument("--valid-fraction", type=float, default=DEFAULT_VALID_FRACTION)
        s.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
        s.add_argument("--text-field", default="text")
        s.add_argument("--on-decode-error", choices=("strict", "replace"), default="strict")
        s.add_argument("--seed", type=int, default=1)
        s.add_argument("--quiet", action="store_true", help="no progress line")
        if name == "part":
            s.add_argument("--task", type=int, required=True, help="this task's index, 0 <= I < N")
            s.add_argument("--workers", type=int, default=usable_cores(), help="tokenizing processes")
        else:
            s.add_argument("--keep-parts", action="store_true", help="keep <out>/.parts after merging")
    a = p.parse_args(argv)
    options = BuildOptions(
        valid_fraction=a.valid_fraction,
        shard_tokens=a.shard_tokens,
        text_field=a.text_field,
        on_decode_error=a.on_decode_error,
        seed=a.seed,
    )
    t0 = time.perf_counter()
    if a.stage == "part":
        rec = build_part(
            a.inputs,
            a.tokenizer,
            a.out,
            task=a.task,
            tasks=a.tasks,
            options=options,
            workers=a.workers,
            progress=not a.quiet,
        )
        print(
            f"task {a.task}/{a.tasks}: {len(rec['files'])} file(s), {rec['documents_read']:,} documents "
            f"-> {part_dir(Path(a.out), a.task)} ({time.perf_counter() - t0:.1f} s)"
        )
        return 0
    manifests = merge_parts(
        a.inputs,
        a.tokenizer,
        a.out,
        tasks=a.tasks,
        options=options,
        keep_parts=a.keep_parts,
        progress=not a.quiet,
    )
    for split, m in manifests.items():
        print(f"{set_summary(Path(a.out) / split, m)} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as e:
        print(f"build-shards-parallel: error: {e}", file=sys.stderr)
        sys.exit(1)
