"""Fault injection, disk full: a save that cannot be written must fail loudly and commit nothing.

Guarantee 10. The run's output_dir is a tmpfs mounted just for the test (needs root: skipped with
the reason otherwise; CI runs as root), sized from the reference run's checkpoints so that the
first checkpoint (step 2) fits and the second (step 4) does not. The rank whose write fails raises
`checkpoint.SaveFailed` (what it was writing, the error, the free space, and that nothing was
committed) and exits 1 at once; the other rank, unless its own write failed too, is left in
DeepSpeed's closing barrier and fails there (exit 4, relaying the first rank's message); the
launcher exits non-zero. Afterwards:
no step after 4 was trained, `latest` still names step 2, and step 2 verifies and loads.

Cost: 1 launch (+ the shared reference run, for the checkpoint size).
"""

from __future__ import annotations

import os
import subprocess

import pytest
from ds_scripts.fault_jobs import fault_args, launch_job, reference_run, tag_dir

from roberta_ds.checkpoint import commit as ckpt

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path_factory, small_tokenizer, small_shards, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root (CI runs as root)")
    reference = reference_run(tmp_path_factory, small_tokenizer, small_shards)
    step2 = tag_dir(reference.out_dir, 2)
    one_checkpoint = sum(p.stat().st_size for p in step2.iterdir())
    size_kib = (one_checkpoint + one_checkpoint // 2) // 1024 + 512  # 1.5 checkpoints + tokenizer copy, logs
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_save_fails_loudly_and_keeps_the_previous_checkpoint(small_tokenizer, small_shards,
                                                                               small_disk):
    from roberta_ds.checkpoint.read_weights import load_weights

    out = small_disk / "run"
    ckpts = out / "checkpoints"
    job = launch_job(fault_args(small_tokenizer, small_shards, out, steps=6))
    assert job.returncode not in (None, 0), job.tail()
    # The rank whose write failed says what, why, and that nothing was committed.
    failed = [x for x in job.output.splitlines() if "checkpoint save failed while writing" in x]
    assert failed and failed[0].startswith("[roberta-ds] rank "), job.tail()
    assert f"{ckpts / '.staging-step_00000004'}" in failed[0]
    assert f"Nothing was committed: {ckpts / 'latest'} still names step_00000002" in failed[0]
    assert "MiB free there now" in failed[0]
    assert job.orphans == [], job.orphans
    # Training did not go on as if saved.
    assert max(job.losses()) == 4, job.tail()
    assert "committed (interval)" in job.output and job.output.count("committed (interval)") == 1
    # The previous checkpoint is intact and loadable.
    assert [c.step for c in ckpt.committed(ckpts)] == [2]
    assert ckpt.read_pointer(ckpts) == "step_00000002"
    step2 = tag_dir(out, 2)
    ckpt.verify_files(step2, ckpt.read_meta(step2), shard=lambda i: True)
    weights = load_weights(step2)
    assert weights and all(t.isfinite().all() for t in weights.values())
