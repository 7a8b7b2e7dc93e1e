"""Crash-safe checkpoints on top of DeepSpeed's save/load: staging, checksums, atomic commit, resume.

DeepSpeed's own `save_checkpoint` writes shards in place and updates `latest` before its closing
barrier, so a crash can leave a `latest` that names a half-written checkpoint. Ours commits:

    1. every rank:  engine.save_checkpoint(<dir>/.staging-<tag>, save_latest=False) + its RNG file
    2. every rank:  fsync what it wrote; barrier
    3. all ranks:   sha256 of the staged files, split across ranks, gathered on rank 0
    4. rank 0:      writes <staging>/roberta_ds.json (the manifest: step, data cursor, configs,
                    tokenizer fingerprint, every file's size and sha256), fsyncs, renames
                    .staging-<tag> -> <tag>, then rewrites `latest` (temp + fsync + rename)
    5. barrier; rank 0 deletes checkpoints beyond keep_last (rename to .trash-*, then remove)

A checkpoint is committed exactly when its directory has a manifest and no `.staging-` prefix.
`latest` is a plain text file with the tag, as DeepSpeed's tools (zero_to_fp32, ds_to_universal)
expect. Resuming verifies sizes and checksums (split across ranks) and refuses DeepSpeed files
whose pickles reference anything beyond tensors and a short allowlist of DeepSpeed's own classes
(`torch.load(weights_only=True)`), before DeepSpeed's loader (which unpickles with
weights_only=False) ever sees them. Our own state (manifest, RNG) is JSON: nothing of ours unpickles.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from roberta_ds.errors import CheckpointError
from roberta_ds.shards import atomic_write_bytes, file_sha256, fsync_dir

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
# RNG state as JSON (no pickles)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (torch CPU + CUDA, numpy, python) as a JSON-able dict."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch_cpu": _b64(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), *[float(x) if isinstance(x, float) else int(x) for x in np_state[2:]]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch_cpu"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), int(n[2]), int(n[3]), float(n[4])))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if torch.cuda.is_available() and "torch_cuda" in state:
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["torch_cuda"]])


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.json"


# ----------------------------------------------------------------------------------------------
# Safety scan of DeepSpeed's pickles

# Classes DeepSpeed 0.16-0.19 put in its own checkpoint files; nothing here runs code on load.
_DS_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)


def _safe_globals() -> list[Any]:
    import importlib

    out = []
    for dotted in _DS_SAFE_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return out


def check_pickle_safe(path: Path) -> None:
    """Refuse a torch file whose pickle needs anything beyond tensors and DeepSpeed's own state classes.

    Runs the weights-only unpickler (no arbitrary code) with mmap, so the tensors are not read.
    """
    import zipfile

    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch checkpoint archive (truncated, corrupt or another format)")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any refusal is reported the same way
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            if unsafe:
                detail = f"it references {sorted(unsafe)}"
        except Exception:  # noqa: BLE001 - not a zip checkpoint at all: keep the first message
            pass
        raise CheckpointError(
            f"{path}: refused to load: {detail}. A checkpoint file must hold only tensors and DeepSpeed's "
            "own state; this one could run code when unpickled (tampered, or not from roberta-ds)"
        ) from None


# ----------------------------------------------------------------------------------------------
# Committed checkpoints on disk


@dataclass(frozen=True)
class Committed:
    tag: str
    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def read_meta(tag_dir: Path) -> dict[str, Any]:
    path = tag_dir / META_NAME
    if not path.is_file():
        raise CheckpointError(f"{tag_dir}: no {META_NAME}; not a committed roberta-ds checkpoint (interrupted save?)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt manifest ({e})") from None
    for key in ("step", "files", "model", "tokenizer_sha256", "world_size", "samples_consumed"):
        if key not in meta:
            raise CheckpointError(f"{path}: manifest lacks {key!r}")
    return meta


def committed(ckpt_dir: Path) -> list[Committed]:
    """Committed checkpoints, oldest first (by step)."""
    out = []
    if not ckpt_dir.is_dir():
        return out
    for d in ckpt_dir.iterdir():
        if d.is_dir() and step_of(d.name) is not None and (d / META_NAME).is_file():
            try:
                out.append(Committed(d.name, d, read_meta(d)))
            except CheckpointError:
                continue
    return sorted(out, key=lambda c: c.step)


def read_pointer(ckpt_dir: Path) -> str | None:
    p = ckpt_dir / POINTER_NAME
    if not p.exists():
        return None
    tag = p.read_text().strip()
    if not tag or "/" in tag or step_of(tag) is None:
        raise CheckpointError(f"{p}: corrupt pointer {tag[:60]!r}; expected a tag like step_00001000")
    return tag


def verify_files(tag_dir: Path, meta: dict[str, Any], shard: Callable[[int], bool]) -> None:
    """Sizes of every file, and sha256 + pickle safety of the files `shard(i)` selects (split across ranks)."""
    files = meta["files"]
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


# ----------------------------------------------------------------------------------------------
# Collectives used by save/resume (thin, so tests can run them in one process)


class Comm:
    """The few collectives checkpointing needs; world 1 without torch.distributed is allowed."""

    def __init__(self) -> None:
        self.on = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if self.on else 0
        self.world = torch.distributed.get_world_size() if self.on else 1

    def barrier(self) -> None:
        if self.on:
            torch.distributed.barrier()

    def gather_to_all(self, obj: Any) -> list[Any]:
        if not self.on:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def agree_error(self, error: str | None) -> None:
        """Raise the first rank's error on every rank (so all ranks stop together, same message)."""
        errors = [e for e in self.gather_to_all(error) if e]
        if errors:
            raise CheckpointError(errors[0])


def _fsync_tree(root: Path) -> None:
    for dirpath, _, names in os.walk(root):
        for n in names:
            fd = os.open(os.path.join(dirpath, n), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def save(engine: Any, ckpt_dir: Path, step: int, meta: dict[str, Any], keep_last: int,
         fault: Callable[[str], None] = lambda _: None) -> Path:
    """Save and commit a checkpoint of `engine` at optimizer step `step` (all ranks call this)."""
    comm = Comm()
    tag = tag_for(step)
    staging_tag = STAGING_PREFIX + tag
    staging = ckpt_dir / staging_tag
    final = ckpt_dir / tag
    if comm.rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if staging.exists():  # left by a save that crashed: never committed, safe to drop
            shutil.rmtree(staging)
    comm.barrier()
    # DeepSpeed's client_state lands in rank 0's model-states file; ds_to_universal needs this key.
    engine.save_checkpoint(str(ckpt_dir), tag=staging_tag, save_latest=False,
                           client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}})
    (staging / rng_file(comm.rank)).write_text(json.dumps(capture_rng()))
    fault("save:written")
    _fsync_tree(staging)
    comm.barrier()
    names = sorted(p.name for p in staging.iterdir() if p.is_file())
    mine = {n: {"bytes": (staging / n).stat().st_size, "sha256": file_sha256(staging / n)}
            for i, n in enumerate(names) if i % comm.world == comm.rank}
    files: dict[str, Any] = {}
    for part in comm.gather_to_all(mine):
        files.update(part)
    if comm.rank == 0:
        full = {**meta, "meta_version": META_VERSION, "step": step, "tag": tag, "files": files}
        atomic_write_bytes(staging / META_NAME, (json.dumps(full, indent=2, sort_keys=True) + "\n").encode())
        fault("save:before_rename")
        if final.exists():  # an older commit of the same step (e.g. a re-run): replace it atomically
            _trash(final)
        os.replace(staging, final)
        fsync_dir(ckpt_dir)
        fault("save:before_pointer")
        atomic_write_bytes(ckpt_dir / POINTER_NAME, tag.encode())
        prune(ckpt_dir, keep_last)
    comm.barrier()
    return final


def _trash(path: Path) -> None:
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}.{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete committed checkpoints beyond the newest `keep_last`, and leftovers of crashed saves."""
    latest = read_pointer(ckpt_dir)
    for c in committed(ckpt_dir)[:-keep_last]:
        if c.tag != latest:
            _trash(c.path)
            shutil.rmtree(ckpt_dir / (c.tag + UNIVERSAL_SUFFIX), ignore_errors=True)
    for d in ckpt_dir.iterdir():
        if d.name.startswith(TRASH_PREFIX):
            shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Resume


def select(ckpt_dir: Path, resume: str, fallback: bool) -> list[Committed]:
    """Checkpoints to try, in order, for `--resume auto|none|<tag dir>`; [] means start fresh.

    `auto` with no checkpoint directory (or an empty one) starts fresh; a directory that holds
    checkpoints but whose `latest` is missing or corrupt is an error, never a silent restart.
    """
    if resume == "none":
        return []
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
        if (path / POINTER_NAME).exists() or not (path / META_NAME).exists():
            return select(path, "auto", fallback)
        return [Committed(path.name, path, read_meta(path))]
    found = committed(ckpt_dir)
    staged = [d.name for d in ckpt_dir.iterdir() if d.name.startswith(STAGING_PREFIX)] if ckpt_dir.is_dir() else []
    tag = read_pointer(ckpt_dir)
    if tag is None:
        if found or staged:
            what = ", ".join([c.tag for c in found] + staged)
            raise CheckpointError(
                f"{ckpt_dir / POINTER_NAME}: missing, but the directory holds checkpoints ({what}). Refusing to "
                f"start from step 0; pass --resume {ckpt_dir}/<tag> to choose one, or --resume none to start over"
            )
        return []
    by_tag = {c.tag: c for c in found}
    if tag not in by_tag:
        if not fallback:
            raise CheckpointError(
                f"{ckpt_dir / POINTER_NAME} names {tag}, which is not a committed checkpoint "
                f"(missing or without {META_NAME}); --resume-fallback uses the newest earlier complete one"
            )
        return [c for c in reversed(found)]
    chosen = by_tag[tag]
    if not fallback:
        return [chosen]
    return [chosen] + [c for c in reversed(found) if c.step < chosen.step]
