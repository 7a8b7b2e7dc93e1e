"""Choosing, verifying and loading the checkpoint a run resumes from (all ranks take part).

Order of work: pick candidates (`checkpoint.select`: the newest committed first), check each
against the run (tokenizer, model shape, global batch: refused by name, never silently accepted),
verify files (sizes everywhere, sha256, unlisted files and pickle safety split across ranks,
errors agreed so every rank stops with one message; with --resume-fallback a refused checkpoint
is skipped for the next older one), and, when the world size changed, convert once to
DeepSpeed's universal format (`ds_to_universal`) into `<tag>_universal` (staged, given its own
manifest, renamed; a reused conversion is verified like a checkpoint, and converted again if it
fails). Loading itself happens after `deepspeed.initialize` (see train.py), by DeepSpeed's loader,
which unpickles with weights_only=False: only what passed these checks reaches it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from roberta_ds.checkpoint import commit as ckpt
from roberta_ds.comm import Comm
from roberta_ds.config import WEIGHT_FREE_FIELDS
from roberta_ds.durable import check_pickle_safe, fsync_tree
from roberta_ds.errors import CheckpointError


@dataclass(frozen=True)
class ResumePoint:
    chosen: ckpt.Committed
    load_dir: Path
    load_tag: str
    universal: bool


def check_compatible(meta: dict[str, Any], *, model: dict[str, Any], tokenizer_sha256: str,
                     global_batch: int, where: Path) -> None:
    """Refuse resuming with another tokenizer, model shape or global batch (each named)."""
    if meta["tokenizer_sha256"] != tokenizer_sha256:
        raise CheckpointError(
            f"{where}: trained with tokenizer sha256 {meta['tokenizer_sha256'][:12]}..., but this run's "
            f"tokenizer (and data manifest) has {tokenizer_sha256[:12]}...; resume with the original "
            "tokenizer and shards, or start a new run (--resume none, another output_dir)"
        )
    diff = {k: (meta["model"].get(k), v) for k, v in model.items()
            if k not in WEIGHT_FREE_FIELDS and meta["model"].get(k) != v}
    if diff:
        detail = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"{where}: belongs to another model shape ({detail})")
    if meta.get("global_batch") != global_batch:
        raise CheckpointError(
            f"{where}: trained with global batch {meta.get('global_batch')}, this run has {global_batch}. "
            "The data cursor and the LR schedule are per optimizer step of that batch; keep "
            "train_batch_size unchanged (micro batch and GPU count may change)"
        )


def choose(candidates: list[ckpt.Committed], comm: Comm, fallback: bool,
           check: Callable[[ckpt.Committed], None], log: Callable[[str], None]) -> ckpt.Committed | None:
    """The first candidate that passes `check` and file verification on every rank."""
    for i, cand in enumerate(candidates):
        error = cand.error  # an unreadable manifest: refused like a corrupt file
        if error is None:
            check(cand)  # a configuration mismatch is never "fallen back" from
            try:
                ckpt.verify_files(cand.path, cand.meta, shard=lambda k: k % comm.world == comm.rank)
            except CheckpointError as e:
                error = str(e)
        try:
            comm.agree_error(error)
            return cand
        except CheckpointError as e:
            if not fallback or i == len(candidates) - 1:
                hint = "" if fallback else "; --resume-fallback uses the previous complete checkpoint"
                raise CheckpointError(f"{e}{hint}") from None
            log(f"checkpoint {cand.tag} refused: {e}; falling back to an earlier one")
    return None


def _tidy(ckpt_dir: Path, chosen: ckpt.Committed, log: Callable[[str], None]) -> None:
    """Rank 0, once a checkpoint is chosen: newer ones out of auto's way, `latest` naming the chosen one."""
    moved = ckpt.supersede(ckpt_dir, chosen.step)
    if moved:
        log(f"resuming from {chosen.tag}: moved the newer checkpoint(s) {', '.join(moved)} to "
            f"{ckpt_dir / 'superseded'} so that a later --resume auto does not jump forward to them")
    try:
        pointer = ckpt.read_pointer(ckpt_dir)
    except CheckpointError:
        pointer = None
    if pointer != chosen.tag:
        if pointer is not None and (ckpt.step_of(pointer) or 0) < chosen.step:
            log(f"{ckpt_dir / ckpt.POINTER_NAME} named {pointer}, but {chosen.tag} is committed (the job "
                "stopped between the commit and the pointer update); resuming from the newer one")
        ckpt.atomic_write_bytes(ckpt_dir / ckpt.POINTER_NAME, chosen.tag.encode())


def universal_dir(chosen: ckpt.Committed) -> Path:
    return chosen.path.with_name(chosen.tag + ckpt.UNIVERSAL_SUFFIX)


def _reusable(out: Path, comm: Comm, log: Callable[[str], None]) -> bool:
    """Is an existing conversion complete and unaltered? (verified like a checkpoint, split across ranks)"""
    exists = comm.gather_to_all((out / ckpt.META_NAME).is_file() if comm.rank == 0 else False)[0]
    if not exists:
        return False
    error = None
    try:
        meta = json.loads((out / ckpt.META_NAME).read_text())
        ckpt.verify_files(out, meta, shard=lambda k: k % comm.world == comm.rank)
    except (CheckpointError, OSError, ValueError, KeyError, TypeError) as e:
        error = str(e)
    errors = [e for e in comm.gather_to_all(error) if e]
    if errors:
        log(f"{out.name}: refused ({errors[0]}); converting again")
    return not errors


def convert_to_universal(chosen: ckpt.Committed, comm: Comm, log: Callable[[str], None]) -> Path:
    """Rank 0 runs DeepSpeed's ds_to_universal once (staged, renamed); everyone waits for it.

    The conversion gets a manifest of its own (sizes and sha256 of every file), so a later resume
    reuses it only after verifying it as it would a checkpoint (DeepSpeed unpickles these files too).
    """
    out = universal_dir(chosen)
    if _reusable(out, comm, log):
        return out
    error = None
    if comm.rank == 0:
        staging = out.with_name(ckpt.STAGING_PREFIX + out.name)
        shutil.rmtree(staging, ignore_errors=True)
        log(f"world size changed ({chosen.meta['world_size']} -> {comm.world}): converting {chosen.tag} "
            f"to DeepSpeed's universal format in {out.name}")
        try:
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            ds_to_universal(argparse.Namespace(
                input_folder=str(chosen.path), output_folder=str(staging), num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False))
            solo = Comm.single()
            meta = {"universal_of": chosen.tag, "step": chosen.step, "files": ckpt.file_table(staging, solo)}
            for f in meta["files"]:  # vetted before anything loads them
                if f.endswith(".pt"):
                    check_pickle_safe(staging / f)
            ckpt.atomic_write_bytes(staging / ckpt.META_NAME, (json.dumps(meta, indent=1) + "\n").encode())
            fsync_tree(staging)
            if out.exists():
                shutil.rmtree(out)
            os.replace(staging, out)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = f"{chosen.path}: conversion to a universal checkpoint failed: {type(e).__name__}: {e}"
    comm.agree_error(error)
    return out


def plan_resume(ckpt_dir: Path, resume: str, fallback: bool, comm: Comm, *, zero_stage: int,
                check: Callable[[ckpt.Committed], None], log: Callable[[str], None]) -> ResumePoint | None:
    """Everything before `deepspeed.initialize`: which checkpoint, and whether it loads as universal."""
    # Rank 0 reads the directory and everyone uses its answer (no two views of a changing directory).
    error, tags = None, []
    if comm.rank == 0:
        try:
            tags = [(str(c.path), c.tag) for c in ckpt.select(ckpt_dir, resume, fallback)]
        except CheckpointError as e:
            error = str(e)
    comm.agree_error(error)
    tags = comm.gather_to_all(tags)[0]
    if comm.rank == 0 and not tags and resume == "auto":
        leftovers = ckpt.clean_leftovers(ckpt_dir)
        if leftovers:
            log(f"no committed checkpoint in {ckpt_dir}; removed leftovers of saves that never committed "
                f"({', '.join(sorted(leftovers))}); starting from step 0")
    candidates = [ckpt.load_entry(Path(path)) for path, _ in tags]
    chosen = choose(candidates, comm, fallback, check, log)
    if chosen is None:
        return None
    if comm.rank == 0 and chosen.path.parent.resolve() == ckpt_dir.resolve():  # never touch another run's
        _tidy(ckpt_dir, chosen, log)
    universal = chosen.meta["world_size"] != comm.world and (zero_stage > 0 or chosen.meta.get("zero_stage", 0) > 0)
    if universal:
        out = convert_to_universal(chosen, comm, log)
        return ResumePoint(chosen, out.parent, out.name, True)
    return ResumePoint(chosen, chosen.path.parent, chosen.tag, False)
