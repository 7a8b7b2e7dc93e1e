"""Crash-safe checkpoints on top of DeepSpeed's save/load: staging, checksums, atomic commit, resume.

DeepSpeed's own `save_checkpoint` writes shards in place and updates `latest` before its closing
barrier, so a crash can leave a `latest` that names a half-written checkpoint. Ours commits:

    1. rank 0:      removes leftovers of interrupted saves (`.staging-*`); barrier
    2. every rank:  engine.save_checkpoint(<dir>/.staging-<tag>, save_latest=False) + its RNG file
    3. every rank:  fsync what it wrote (a full disk often only shows here); barrier
    4. all ranks:   sha256 of the staged files, split across ranks, gathered on rank 0
    5. rank 0:      writes <staging>/roberta_ds.json (the manifest: step, data cursor, configs,
                    tokenizer fingerprint, every file's size and sha256), fsyncs, renames
                    .staging-<tag> -> <tag> (THE commit), then rewrites `latest` (temp + fsync + rename)
    6. barrier; rank 0 deletes checkpoints beyond keep_last (rename to .trash-*, then remove)

A checkpoint is committed exactly when its directory has a manifest and no `.staging-` prefix;
`--resume auto` takes the newest committed one. `latest` is a plain text file with the tag, as
DeepSpeed's tools (zero_to_fp32, ds_to_universal) expect; it trails the commit by one rename, so
a job killed between the two leaves `latest` one checkpoint behind, which resume notices.

A save that fails on one rank (disk full, quota, I/O error) raises `SaveFailed` there: nothing is
committed, `latest` and every earlier checkpoint stay as they were, and the job ends (train.py
exits non-zero at once; the other ranks, left in DeepSpeed's closing barrier, fail in it).

Trust: resuming verifies sizes and checksums (split across ranks), refuses files the manifest does
not list, and refuses DeepSpeed files whose pickles reference anything beyond tensors and a short
allowlist of DeepSpeed's own classes (`torch.load(weights_only=True)`), before DeepSpeed's loader
ever sees them. DeepSpeed's loader itself unpickles with `weights_only=False`, which can run code:
it is only for trusted checkpoints, and the checks here are what make ours trusted (a tampered
file fails its checksum; a file with a matching, rewritten manifest still fails the pickle scan).
Our own state (manifest, RNG) is JSON: nothing of ours unpickles.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from roberta_ds.checkpoint.rng import capture_rng, restore_rng, rng_file  # noqa: F401 - the layout's names
from roberta_ds.comm import Comm
from roberta_ds.durable import (
    atomic_write_bytes,
    check_pickle_safe,
    file_sha256,
    fsync_dir,
    fsync_tree,
    read_json_object,
)
from roberta_ds.errors import CheckpointError

META_NAME = "roberta_ds.json"
POINTER_NAME = "latest"
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
UNIVERSAL_SUFFIX = "_universal"
META_VERSION = 1


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int | None:
    if tag.startswith("step_") and tag[5:].isdigit():
        return int(tag[5:])
    return None


# ----------------------------------------------------------------------------------------------
# Committed checkpoints on disk


@dataclass(frozen=True)
class Committed:
    """A tag directory with a manifest; `error` is set (and `meta` empty) when the manifest is unreadable."""

    tag: str
    path: Path
    meta: dict[str, Any]
    error: str | None = None

    @property
    def step(self) -> int:
        return int(self.meta["step"]) if self.meta else int(step_of(self.tag) or 0)


def read_meta(tag_dir: Path) -> dict[str, Any]:
    path = tag_dir / META_NAME
    if not path.is_file():
        raise CheckpointError(f"{tag_dir}: no {META_NAME}; not a committed roberta-ds checkpoint (interrupted save?)")
    meta = read_json_object(path, CheckpointError, "corrupt manifest", "corrupt manifest (not a JSON object)")
    for key in ("step", "files", "model", "tokenizer_sha256", "world_size", "samples_consumed"):
        if key not in meta:
            raise CheckpointError(f"{path}: manifest lacks {key!r}")
    return meta


def load_entry(tag_dir: Path) -> Committed:
    """The checkpoint in `tag_dir`, with `error` set instead of raising when its manifest is damaged."""
    try:
        return Committed(tag_dir.name, tag_dir, read_meta(tag_dir))
    except CheckpointError as e:
        return Committed(tag_dir.name, tag_dir, {}, str(e))


def scan(ckpt_dir: Path) -> list[Committed]:
    """Every tag directory with a manifest, damaged manifests included (`error` set), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    dirs = [d for d in ckpt_dir.iterdir()
            if d.is_dir() and step_of(d.name) is not None and (d / META_NAME).is_file()]
    return sorted((load_entry(d) for d in dirs), key=lambda c: int(step_of(c.tag) or 0))


def committed(ckpt_dir: Path) -> list[Committed]:
    """Committed checkpoints with a readable manifest, oldest first (by step)."""
    return [c for c in scan(ckpt_dir) if c.error is None]


def read_pointer(ckpt_dir: Path) -> str | None:
    p = ckpt_dir / POINTER_NAME
    if not p.exists():
        return None
    tag = p.read_text().strip()
    if not tag or "/" in tag or step_of(tag) is None:
        raise CheckpointError(f"{p}: corrupt pointer {tag[:60]!r}; expected a tag like step_00001000")
    return tag


def _listed_files(root: Path) -> list[str]:
    """Every file under `root`, as '/'-separated paths relative to it, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def verify_files(tag_dir: Path, meta: dict[str, Any], shard: Callable[[int], bool]) -> None:
    """Sizes of every file, and sha256 + pickle safety of the files `shard(i)` selects (split across ranks).

    A file the manifest does not list is refused too: DeepSpeed's loaders find files by pattern
    (ds_to_universal globs every `*_optim_states.pt`), so an unlisted file would be unpickled unchecked.
    """
    files = meta["files"]
    extra = [n for n in _listed_files(tag_dir) if n != META_NAME and n not in files]
    if extra:
        raise CheckpointError(
            f"{tag_dir / extra[0]}: not listed in {tag_dir / META_NAME}"
            + (f" (nor {len(extra) - 1} more)" if len(extra) > 1 else "")
            + "; a committed checkpoint never gains files. Refusing it: remove the file(s) if you know where "
            "they came from"
        )
    for i, (name, info) in enumerate(sorted(files.items())):
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {tag_dir / META_NAME})")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, manifest says {info['bytes']}: truncated or replaced")
        if shard(i):
            digest = file_sha256(path)
            if digest != info["sha256"]:
                raise CheckpointError(f"{path}: sha256 differs from {tag_dir / META_NAME}: the file is corrupt")
            if name.endswith(".pt"):
                check_pickle_safe(path)


def file_table(root: Path, comm: Comm) -> dict[str, Any]:
    """{relative path: {bytes, sha256}} of every file under `root`, hashed split across ranks."""
    names = _listed_files(root)
    mine = {n: {"bytes": (root / n).stat().st_size, "sha256": file_sha256(root / n)}
            for i, n in enumerate(names) if i % comm.world == comm.rank}
    files: dict[str, Any] = {}
    for part in comm.gather_to_all(mine):
        files.update(part)
    return files


class SaveFailed(CheckpointError):
    """This rank could not write its part of a checkpoint (disk full, quota, I/O error)."""


def clean_leftovers(ckpt_dir: Path) -> list[str]:
    """Remove what interrupted saves, conversions and prunes left (`.staging-*`, `.trash-*`).

    Nothing there was ever committed or is ever loaded; only rank 0 calls this, while no save runs.
    """
    removed = []
    if ckpt_dir.is_dir():
        for d in ckpt_dir.iterdir():
            if d.name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
    return removed


def _free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:,.1f} MiB free there now"
    except OSError:
        return "free space unknown"


def _failed(rank: int, what: str, where: Path, e: BaseException, state: str) -> SaveFailed:
    return SaveFailed(
        f"rank {rank}: checkpoint save failed while {what} ({type(e).__name__}: {str(e).strip()[:400]}; "
        f"{_free_space(where)}). {state} Free space or fix the file system, then rerun with --resume auto"
    )


def save(engine: Any, ckpt_dir: Path, step: int, meta: dict[str, Any], keep_last: int,
         fault: Callable[[str], None] = lambda _: None) -> Path:
    """Save and commit a checkpoint of `engine` at optimizer step `step` (all ranks call this).

    Raises SaveFailed on a rank whose writes fail; the caller must end the job (the other ranks
    are inside DeepSpeed's closing barrier, or ours, and only leave it by a collective error).
    """
    from roberta_ds.launch.watchdog import is_collective_failure

    comm = Comm()
    tag = tag_for(step)
    staging_tag = STAGING_PREFIX + tag
    staging = ckpt_dir / staging_tag
    final = ckpt_dir / tag
    if comm.rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        clean_leftovers(ckpt_dir)  # crashed saves' staging dirs: never committed, and they hold disk space
    comm.barrier()
    try:
        prev = read_pointer(ckpt_dir)
    except CheckpointError:
        prev = "a corrupt tag"
    untouched = (f"Nothing was committed: {ckpt_dir / POINTER_NAME} still names {prev or 'nothing'} and "
                 f"every committed checkpoint is intact; {staging.name} is discarded by the next save.")
    try:
        # DeepSpeed's client_state lands in rank 0's model-states file; ds_to_universal needs this key.
        client_state = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
        engine.save_checkpoint(str(ckpt_dir), tag=staging_tag, save_latest=False, client_state=client_state)
        (staging / rng_file(comm.rank)).write_text(json.dumps(capture_rng()))
        fault("save:written")
        fsync_tree(staging)  # on most file systems a full disk shows at fsync, not at write
    except (OSError, RuntimeError) as e:
        if is_collective_failure(e):
            raise
        raise _failed(comm.rank, f"writing {staging}", ckpt_dir, e, untouched) from e
    comm.barrier()
    files = file_table(staging, comm)
    if comm.rank == 0:
        full = {**meta, "meta_version": META_VERSION, "step": step, "tag": tag, "files": files}
        try:
            text = json.dumps(full, indent=2, sort_keys=True) + "\n"
            atomic_write_bytes(staging / META_NAME, text.encode())
            fault("save:before_rename")
            if final.exists():  # an older commit of the same step (e.g. a re-run): replace it atomically
                _trash(final)
            os.replace(staging, final)  # THE commit
        except OSError as e:
            raise _failed(0, f"committing {staging}", ckpt_dir, e, untouched) from e
        fault("save:before_pointer")
        try:
            fsync_dir(ckpt_dir)
            atomic_write_bytes(ckpt_dir / POINTER_NAME, tag.encode())
        except OSError as e:
            raise _failed(0, f"updating {ckpt_dir / POINTER_NAME}", ckpt_dir, e, f"{final} IS committed "
                          "(resume finds it); only the pointer for DeepSpeed's tools is stale.") from e
        prune(ckpt_dir, keep_last)
    comm.barrier()
    return final


def _trash(path: Path) -> None:
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}.{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete committed checkpoints beyond the newest `keep_last`, and leftovers of crashed prunes."""
    latest = read_pointer(ckpt_dir)
    for c in committed(ckpt_dir)[:-keep_last]:
        if c.tag != latest:
            _trash(c.path)
            shutil.rmtree(ckpt_dir / (c.tag + UNIVERSAL_SUFFIX), ignore_errors=True)
    for d in ckpt_dir.iterdir():
        if d.name.startswith(TRASH_PREFIX):
            shutil.rmtree(d, ignore_errors=True)


def supersede(ckpt_dir: Path, after_step: int) -> list[str]:
    """Move committed checkpoints newer than `after_step` into `<ckpt_dir>/superseded/` (rank 0 only).

    Used when a run resumes from an older checkpoint than the newest (an explicit --resume PATH, or
    a fallback past damaged ones): otherwise a later `--resume auto` would jump forward to the
    abandoned future. Nothing is deleted.
    """
    moved = []
    for c in scan(ckpt_dir):
        if c.step > after_step:
            dest = ckpt_dir / "superseded"
            dest.mkdir(exist_ok=True)
            target = dest / c.tag
            n = 1
            while target.exists():
                target, n = dest / f"{c.tag}.{n}", n + 1
            os.replace(c.path, target)
            universal = ckpt_dir / (c.tag + UNIVERSAL_SUFFIX)
            if universal.is_dir():
                shutil.rmtree(universal, ignore_errors=True)
            moved.append(c.tag)
    if moved:
        fsync_dir(ckpt_dir)
    return moved


# ----------------------------------------------------------------------------------------------
# Resume


def select(ckpt_dir: Path, resume: str, fallback: bool) -> list[Committed]:
    """Checkpoints to try, newest first, for `--resume auto|none|PATH`; [] means start fresh.

    auto: the newest committed checkpoint in `ckpt_dir` (a renamed tag directory with a manifest),
    whatever `latest` says: the pointer is rewritten right after the commit, so a job killed in
    between leaves it one checkpoint behind (resume.plan_resume repairs it), or absent after the
    first commit. `latest` missing next to several checkpoints is an error (it was deleted). With `fallback`, the
    older ones follow, for when the newest fails verification. Refused, never a silent restart
    from step 0 or a silent step back: `latest` naming a checkpoint newer than any left (deleted
    or damaged after its commit) unless `fallback`; `latest` present with no checkpoint left.
    Staging directories only (a first save that never committed): start fresh.
    PATH: a tag directory (exactly that checkpoint) or another checkpoints directory (as auto).
    """
    if resume == "none":
        return []
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
        if path.name.startswith(STAGING_PREFIX):  # it may hold a manifest (killed before the rename)
            raise CheckpointError(f"--resume {resume}: a staging directory; not a committed checkpoint (an "
                                  "interrupted save never is); pass a committed tag directory or the "
                                  "checkpoints directory")
        if (path / META_NAME).exists():
            entry = load_entry(path)
            if entry.error:
                raise CheckpointError(entry.error)
            return [entry]
        if step_of(path.name) is not None:
            raise CheckpointError(f"--resume {resume}: no {META_NAME}; not a committed checkpoint (an "
                                  "interrupted save never is); pass a committed tag directory or the "
                                  "checkpoints directory")
        found = select(path, "auto", fallback)
        if not found:
            raise CheckpointError(f"--resume {resume}: holds no committed checkpoint")
        return found
    entries = list(reversed(scan(ckpt_dir)))  # newest first, damaged manifests included
    tag = read_pointer(ckpt_dir)
    if not entries:
        if tag is not None:
            raise CheckpointError(
                f"{ckpt_dir / POINTER_NAME} names {tag}, but {ckpt_dir} holds no committed checkpoint any "
                "more. Refusing to start from step 0; pass --resume none (or another output_dir) to start "
                "over"
            )
        return []
    if tag is None and len(entries) > 1:
        # `latest` is rewritten after every commit, so only a run's first commit can lack one (a
        # crash between the rename and the pointer write). With several, the pointer was removed.
        raise CheckpointError(
            f"{ckpt_dir / POINTER_NAME}: missing, but {ckpt_dir} holds {len(entries)} checkpoints "
            f"({', '.join(e.tag for e in reversed(entries))}); the pointer was deleted. Refusing to guess or to "
            f"start from step 0: pass --resume {ckpt_dir}/<tag> (the newest is {entries[0].tag}), or --resume "
            "none with another output_dir to start over"
        )
    if tag is not None and step_of(tag) > entries[0].step and not fallback:
        raise CheckpointError(
            f"{ckpt_dir / POINTER_NAME} names {tag}, which is not a committed checkpoint any more (deleted "
            f"or damaged after its commit); --resume-fallback uses the newest complete one "
            f"({entries[0].tag}), or pass --resume {ckpt_dir}/<tag>"
        )
    return entries if fallback else entries[:1]
