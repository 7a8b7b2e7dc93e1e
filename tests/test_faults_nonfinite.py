"""Fault injection, non-finite values: NaN in one rank's loss, +Inf in one rank's gradient, bf16 and fp32.

Guarantee 6: the step is skipped on ALL ranks; parameters and optimizer state (fp32 master
weights, Adam moments, Adam's step counter, the bf16 module) stay bitwise unchanged; the data
cursor still advances (the next step takes the next batch); the skip is logged (console line,
`skipped_steps` in metrics.jsonl and the checkpoint manifest); `max_consecutive_skips` skips in a
row end the run with a checkpoint, a message and EXIT_TOO_MANY_SKIPS (3).

bf16 (ZeRO-2): the shared reference run, which has NaN on rank 1 at step index 2 and Inf on rank 0
at index 3 and checkpoints every 2 steps: step_2 and step_4 must be bitwise equal. That the cursor
advanced through the skipped steps is shown by the crash chain (test_faults_crash.py): a run
resumed from step_4 -- whose data cursor is 4 x global batch by construction -- continues with
losses bitwise equal to the reference's, so the reference also took batch 4 after the skips.
fp32 (ZeRO-2): one launch, the same faults on the other ranks, max_consecutive_skips=2.

Cost: 1 launch (+ the shared reference run).
"""

from __future__ import annotations

import math

import pytest
from ds_scripts.fault_jobs import (
    assert_bitwise_equal_states,
    fault_args,
    launch_job,
    reference_run,
    state_tensors,
    tag_dir,
)

from roberta_ds.checkpoint import commit as ckpt
from roberta_ds.engine.trainer import EXIT_TOO_MANY_SKIPS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_tokenizer, small_shards):
    return reference_run(tmp_path_factory, small_tokenizer, small_shards)


def _skip_line(step: int, in_a_row: int, total: int) -> str:
    return (f"step {step}: non-finite loss or gradients on some rank; update skipped on all ranks "
            f"({in_a_row} in a row, {total} in total)")


def test_bf16_nan_and_inf_skip_everywhere_state_unchanged(reference):
    out = reference.out_dir
    assert "[fault] rank 1: nan at loss step 2" in reference.output
    assert "[fault] rank 0: inf at grad step 3" in reference.output
    assert _skip_line(2, 1, 1) in reference.output and _skip_line(3, 2, 2) in reference.output
    metrics = {r["step"]: r for r in reference.metrics()}
    assert [metrics[s]["skipped_steps"] for s in range(1, 9)] == [0, 0, 1, 2, 2, 2, 2, 2]
    assert [metrics[s]["samples_consumed"] for s in range(1, 9)] == [8 * s for s in range(1, 9)]
    assert math.isnan(metrics[3]["loss"])  # the NaN step's window; the Inf step's loss is finite
    assert all(math.isfinite(metrics[s]["loss"]) for s in (1, 2, 4, 5, 6, 7, 8))
    assert ckpt.read_meta(tag_dir(out, 4))["skipped_steps"] == 2
    # Two skipped steps between the checkpoints of step 2 and step 4: every tensor bitwise equal.
    assert_bitwise_equal_states(tag_dir(out, 2), tag_dir(out, 4))
    # ... and the steps after them did update (the comparison can fail).
    a, b = state_tensors(tag_dir(out, 4)), state_tensors(tag_dir(out, 6))
    assert any(not a[k].equal(b[k]) for k in a)


def test_fp32_nan_and_inf_skip_then_too_many_skips_abort(small_tokenizer, small_shards, tmp_path):
    args = fault_args(small_tokenizer, small_shards, tmp_path / "run",
                      extra=["--ds-set", "bf16.enabled=false", "--set", "max_consecutive_skips=2"])
    job = launch_job(args, faults="nan@loss:step=2,rank=0; inf@grad:step=3,rank=1")
    assert job.returncode == EXIT_TOO_MANY_SKIPS, job.tail()
    assert "fp32, ZeRO-2" in job.output
    assert _skip_line(2, 1, 1) in job.output and _skip_line(3, 2, 2) in job.output
    assert ("aborting: 2 consecutive optimizer steps had non-finite loss or gradients "
            "(max_consecutive_skips=2). Checkpoint saved at step 4") in job.output, job.tail()
    out = job.out_dir
    assert [c.step for c in ckpt.committed(out / "checkpoints")] == [2, 4]
    meta = ckpt.read_meta(tag_dir(out, 4))
    assert (meta["skipped_steps"], meta["consecutive_skips"], meta["samples_consumed"]) == (2, 2, 32)
    assert_bitwise_equal_states(tag_dir(out, 2), tag_dir(out, 4))
    assert [r["skipped_steps"] for r in job.metrics()] == [0, 0, 1, 2]
    assert job.orphans == []
