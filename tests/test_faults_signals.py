"""Fault injection, signals: preemption notices at awkward moments; one checkpoint, exit 75, exact resume.

Guarantee 7, as one chain of two launches in one output directory (checkpoints only on signals:
save_interval=100):
  S1. SIGTERM to rank 0 and to its DataLoader worker (as a scheduler signalling every process)
      during the very first step -> the worker carries on, both ranks finish step 1, commit step 1
      together, exit 75 (REQUEUE_EXIT_CODE, what the SLURM templates requeue on);
  S2. resumed from it (losses bitwise the uninterrupted reference run's: resume equivalence after
      a signal); SIGTERM to rank 1 ONLY during step index 3, then a second signal to each rank
      while they save (SIGUSR1 to rank 1, SIGTERM to rank 0) -> exactly one more checkpoint
      (step 4), exit 75, no step and no save after it; that checkpoint verifies and is bit for bit
      the reference run's step-4 state (tensors and RNG), so resuming from it is exact too.

Cost: 2 launches (+ the shared reference run).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from ds_scripts.fault_jobs import (
    VALUE_FAULTS,
    assert_bitwise_equal_states,
    assert_losses_match,
    fault_args,
    launch_job,
    reference_run,
    resumed_from,
    tag_dir,
)

from roberta_ds.checkpoint import commit as ckpt
from roberta_ds.engine.trainer import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_tokenizer, small_shards):
    return reference_run(tmp_path_factory, small_tokenizer, small_shards)


def _clean(ckpt_dir: Path) -> None:
    left = [d.name for d in ckpt_dir.iterdir() if d.name.startswith((ckpt.STAGING_PREFIX, ckpt.TRASH_PREFIX))]
    assert left == []


def test_signals_save_once_requeue_and_resume_exactly(reference, small_tokenizer, small_shards, tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    # One DataLoader worker per rank (the data do not depend on the worker count: same losses).
    args = fault_args(small_tokenizer, small_shards, out,
                      extra=["--set", "save_interval=100", "--set", "data.num_workers=1"])

    s1 = launch_job(args, faults=f"{VALUE_FAULTS}; sigterm_tree@step:step=0,rank=0")
    assert s1.returncode == REQUEUE_EXIT_CODE, s1.tail()
    assert "[fault] rank 0: sigterm_tree at step step 0" in s1.output
    assert "[roberta-ds] stopped by SIGTERM at step 1" in s1.output
    assert [c.step for c in ckpt.committed(ckpts)] == [1] and ckpt.read_pointer(ckpts) == "step_00000001"
    _clean(ckpts)
    assert_losses_match(s1, reference, range(1, 2))
    assert s1.orphans == []

    s2 = launch_job(args, faults=(f"{VALUE_FAULTS}; sigterm@step:step=3,rank=1; "
                                  "sigusr1@save:written:step=4,rank=1; sigterm@save:written:step=4,rank=0"))
    assert s2.returncode == REQUEUE_EXIT_CODE, s2.tail()
    assert resumed_from(s2) == 1
    for fired in ("rank 1: sigterm at step step 3", "rank 1: sigusr1 at save:written step 4",
                  "rank 0: sigterm at save:written step 4"):
        assert f"[fault] {fired}" in s2.output, s2.tail()
    # Rank 0 (which prints) got no signal of its own before the boundary: the stop came from rank 1.
    assert "[roberta-ds] stopped by a signal on another rank at step 4" in s2.output, s2.tail()
    assert s2.output.count("committed (signal") == 1
    assert [c.step for c in ckpt.committed(ckpts)] == [1, 4] and ckpt.read_pointer(ckpts) == "step_00000004"
    _clean(ckpts)
    assert_losses_match(s2, reference, range(2, 5))
    assert max(s2.losses()) == 4  # no step after the stop
    assert s2.orphans == []
    meta = ckpt.read_meta(tag_dir(out, 4))
    assert (meta["step"], meta["samples_consumed"], meta["skipped_steps"]) == (4, 32, 2)

    # The checkpoint written while signals kept arriving is the uninterrupted run's step-4 state, bit
    # for bit: every tensor and every rank's RNG state. (That a resume from the reference's step 4
    # continues exactly is shown by the crash chain in test_faults_crash.py.)
    ref4 = tag_dir(reference.out_dir, 4)
    ckpt.verify_files(tag_dir(out, 4), meta, shard=lambda i: True)
    assert_bitwise_equal_states(tag_dir(out, 4), ref4)
    for r in (0, 1):
        assert (tag_dir(out, 4) / ckpt.rng_file(r)).read_bytes() == (ref4 / ckpt.rng_file(r)).read_bytes()
