"""Fault injection, crashes: kill -9 of the whole job at assorted points, and damaged checkpoints.

Guarantee 1: after `kill -9` of the whole job (launcher and ranks) during a step, during a save,
after a save's manifest but before its commit, or between the commit and the `latest` update,
`--resume auto` starts from the newest complete checkpoint and continues exactly (its losses are
bitwise those of the uninterrupted reference run); a half-written checkpoint is never loaded.
ONE chain of launches in one output directory checks all four points, each resumed launch being
killed at the next point (see test_kill_9_chain).

Guarantee 2: a checkpoint file truncated or bit-flipped after commit (or its manifest damaged) is
refused at resume, naming the file; with --resume-fallback the previous complete one is used
(in-process on copies of the reference run's checkpoints, plus the last link of the chain, which
falls back for real and still ends bitwise equal to the reference).

Guarantee 1 includes the run lock: each killed launch leaves its output directory's run.lock (a
holder killed with kill -9 cannot release it) and the next launch takes it over once the heartbeat is
older than lock_timeout_s (2 s here), saying so in one log line.

Cost: 5 launches (+ the shared reference run).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from ds_scripts.fault_jobs import (
    VALUE_FAULTS,
    assert_bitwise_equal_states,
    assert_losses_match,
    copy_run,
    fault_args,
    launch_job,
    plan_here,
    reference_run,
    resumed_from,
    tag_dir,
    took_over,
    wait_until_lock_is_stale,
)

from roberta_ds.checkpoint import commit as ckpt
from roberta_ds.checkpoint.resume import plan_resume
from roberta_ds.comm import Comm
from roberta_ds.errors import CheckpointError


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_tokenizer, small_shards):
    return reference_run(tmp_path_factory, small_tokenizer, small_shards)


def _tags(ckpt_dir: Path) -> list[int]:
    return [c.step for c in ckpt.committed(ckpt_dir)]


def _staging(ckpt_dir: Path) -> list[str]:
    return sorted(d.name for d in ckpt_dir.iterdir() if d.name.startswith(ckpt.STAGING_PREFIX))


@pytest.mark.slow
def test_kill_9_chain(reference, small_tokenizer, small_shards, tmp_path):
    """Five launches in one output directory; every one but the last is SIGKILLed with its launcher.

    The reference run skips steps 2 (NaN loss on rank 1) and 3 (Inf gradient on rank 0); so does
    every launch here, so the chain also shows that a checkpoint written right after skipped steps
    resumes exactly, i.e. the data cursor advanced through them.
    """
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    args = fault_args(small_tokenizer, small_shards, out)

    # A: killed during the save of step 4: rank 1 has written its files (not yet fsynced).
    a = launch_job(args, faults=f"{VALUE_FAULTS}; kill_job@save:written:step=4,rank=1")
    assert a.returncode != 0 and "[fault] rank 1: kill_job at save:written step 4" in a.output, a.tail()
    assert _tags(ckpts) == [2] and _staging(ckpts) == [".staging-step_00000004"]
    assert ckpt.read_pointer(ckpts) == "step_00000002"
    assert_losses_match(a, reference, range(1, 5))

    # B: resumes from step 2, never from the half-written step 4; killed in the middle of step index 5
    # (after rank 0's first forward). A's lock is taken over once stale.
    left = wait_until_lock_is_stale(out)
    assert left is not None, "a job killed with kill -9 cannot release its run.lock"
    b = launch_job(args, faults=f"{VALUE_FAULTS}; kill_job@loss:step=5,rank=0")
    assert took_over(b, left), b.tail()
    assert resumed_from(b) == 2, b.tail()
    assert "[fault] rank 0: kill_job at loss step 5" in b.output, b.tail()
    assert_losses_match(b, reference, range(3, 6))
    assert _tags(ckpts) == [2, 4] and _staging(ckpts) == []

    # C: resumes from step 4, written right after the two skipped steps. Killed once step 6 is
    # committed (renamed) but before `latest` names it.
    left = wait_until_lock_is_stale(out)
    c = launch_job(args, faults=f"{VALUE_FAULTS}; kill_job@save:before_pointer:step=6,rank=0")
    assert took_over(c, left) and resumed_from(c) == 4, c.tail()
    assert_losses_match(c, reference, range(5, 7))
    assert _tags(ckpts) == [2, 4, 6] and ckpt.read_pointer(ckpts) == "step_00000004"

    # D: resumes from the newest complete checkpoint, step 6, although `latest` still names step 4
    # (and repairs `latest`). Killed after step 8's manifest is written, before the rename.
    left = wait_until_lock_is_stale(out)
    d = launch_job(args, faults=f"{VALUE_FAULTS}; kill_job@save:before_rename:step=8,rank=0")
    assert took_over(d, left) and resumed_from(d) == 6, d.tail()
    assert "named step_00000004, but step_00000006 is committed" in d.output
    assert_losses_match(d, reference, range(7, 9))
    assert _tags(ckpts) == [2, 4, 6] and ckpt.read_pointer(ckpts) == "step_00000006"
    assert (ckpts / ".staging-step_00000008" / ckpt.META_NAME).is_file()  # complete-looking, uncommitted

    # E: one byte of step 6 flipped after its commit. --resume-fallback: step 6 is refused naming the
    # file, the staged step 8 (manifest and all) is never considered, step 4 is used.
    victim = sorted(tag_dir(out, 6).glob("*optim_states.pt"))[1]
    _flip_byte(victim)
    left = wait_until_lock_is_stale(out)
    e = launch_job(args + ["--resume-fallback"], faults=VALUE_FAULTS)
    assert e.returncode == 0 and took_over(e, left), e.tail()
    assert not (out / "run.lock").exists()  # a clean exit releases it
    assert f"checkpoint step_00000006 refused: {victim}: sha256 differs" in e.output, e.tail()
    assert resumed_from(e) == 4
    assert_losses_match(e, reference, range(5, 9))
    assert _tags(ckpts) == [2, 4, 6, 8] and ckpt.read_pointer(ckpts) == "step_00000008"
    assert _staging(ckpts) == [] and (ckpts / "superseded" / "step_00000006").is_dir()
    # Every tensor of the final state (weights, master weights, Adam moments, step counters) is
    # bitwise the uninterrupted run's.
    assert_bitwise_equal_states(tag_dir(out, 8), tag_dir(reference.out_dir, 8))


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow  # on copies of the shared reference run
@pytest.mark.parametrize("damage", ["truncated", "bit-flipped", "manifest", "missing", "unlisted"])
def test_damaged_checkpoint_is_refused_naming_the_file(reference, tmp_path, damage):
    """Resume verifies the newest checkpoint; a damaged file is named; --resume-fallback takes step 6."""
    run = copy_run(reference.out_dir, tmp_path / "run")
    newest = tag_dir(run, 8)
    victim = newest / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "truncated":
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size - 100)
        expect = f"{victim}: {victim.stat().st_size} bytes, manifest says"
    elif damage == "bit-flipped":
        _flip_byte(victim)
        expect = f"{victim}: sha256 differs"
    elif damage == "manifest":
        victim = newest / ckpt.META_NAME
        _flip_byte(victim, offset=0)  # '{' -> 'z'
        expect = f"{victim}: corrupt manifest"
    elif damage == "missing":
        victim.unlink()
        expect = f"{victim}: missing"
    else:
        victim = newest / "zero_pp_rank_2_mp_rank_00_optim_states.pt"
        shutil.copy(newest / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", victim)
        expect = f"{victim}: not listed in"
    with pytest.raises(CheckpointError) as err:
        plan_here(run, fallback=False)
    assert expect in str(err.value) and "--resume-fallback" in str(err.value)

    logs: list[str] = []
    point = plan_here(run, fallback=True, log=logs)
    assert point is not None and point.chosen.tag == "step_00000006"
    # One process here, two wrote it: resumed through a verified universal conversion of step 6.
    assert point.universal and (point.load_dir / point.load_tag / ckpt.META_NAME).is_file()
    assert any(expect in line for line in logs), logs
    # The damaged one is moved out of auto's way (kept), and `latest` names what was resumed.
    assert (run / "checkpoints" / "superseded" / "step_00000008").is_dir()
    assert ckpt.read_pointer(run / "checkpoints") == "step_00000006"


def _fake_commit(ckpt_dir: Path, step: int) -> Path:
    """A tag directory with a minimal manifest (for choosing logic only; nothing loads it)."""
    d = ckpt_dir / ckpt.tag_for(step)
    d.mkdir(parents=True)
    meta = {"step": step, "files": {}, "model": {}, "tokenizer_sha256": "x", "world_size": 1,
            "samples_consumed": 8 * step}
    (d / ckpt.META_NAME).write_text(json.dumps(meta))
    return d


def test_select_newest_committed_whatever_the_pointer_says(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    assert ckpt.select(d, "auto", False) == []  # empty: fresh start
    (d / ".staging-step_00000002").mkdir()
    assert ckpt.select(d, "auto", False) == []  # a first save that never committed: fresh start
    _fake_commit(d, 2)
    assert [c.tag for c in ckpt.select(d, "auto", False)] == ["step_00000002"]  # no `latest` yet
    _fake_commit(d, 4)
    (d / "latest").write_text("step_00000002")  # killed between the commit of 4 and the pointer update
    assert [c.tag for c in ckpt.select(d, "auto", False)] == ["step_00000004"]
    assert [c.tag for c in ckpt.select(d, "auto", True)] == ["step_00000004", "step_00000002"]
    (d / "latest").write_text("step_00000006")  # names a checkpoint deleted after its commit
    with pytest.raises(CheckpointError, match="names step_00000006, which is not a committed checkpoint"):
        ckpt.select(d, "auto", False)
    assert [c.tag for c in ckpt.select(d, "auto", True)] == ["step_00000004", "step_00000002"]
    (d / "latest").write_text("garbage")
    with pytest.raises(CheckpointError, match="corrupt pointer"):
        ckpt.select(d, "auto", False)
    # Explicit paths: a tag directory is exactly that checkpoint; an uncommitted one is refused.
    (d / "latest").write_text("step_00000004")
    assert [c.tag for c in ckpt.select(d, str(d / "step_00000002"), False)] == ["step_00000002"]
    staged = d / ".staging-step_00000002"
    shutil.copy(d / "step_00000002" / ckpt.META_NAME, staged / ckpt.META_NAME)  # killed before the rename
    with pytest.raises(CheckpointError, match="a staging directory; not a committed checkpoint"):
        ckpt.select(d, str(staged), False)
    assert [c.tag for c in ckpt.select(d, "auto", True)] == ["step_00000004", "step_00000002"]
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="holds no committed checkpoint"):
        ckpt.select(d, str(empty), False)
    # Every checkpoint gone but `latest` left: never a silent restart from step 0.
    for c in ckpt.committed(d):
        shutil.rmtree(c.path)
    with pytest.raises(CheckpointError, match="Refusing to start from step 0"):
        ckpt.select(d, "auto", False)


def test_resuming_an_older_checkpoint_supersedes_newer_ones(tmp_path):
    """--resume <older tag>: newer checkpoints move to superseded/, so a later auto does not jump to them."""
    d = tmp_path / "checkpoints"
    for s in (2, 4, 6):
        _fake_commit(d, s)
    (d / "latest").write_text("step_00000006")
    logs: list[str] = []
    point = plan_resume(d, str(d / "step_00000002"), False, Comm.single(), zero_stage=2,
                        check=lambda c: None, log=logs.append)
    assert point.chosen.tag == "step_00000002"
    assert _tags(d) == [2] and ckpt.read_pointer(d) == "step_00000002"
    assert sorted(p.name for p in (d / "superseded").iterdir()) == ["step_00000004", "step_00000006"]
    assert any("moved the newer checkpoint(s)" in line for line in logs)
