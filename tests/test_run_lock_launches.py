"""One run per output directory, with real launches (2 CPU ranks under the `deepspeed` launcher).

A run is held at the start of its third step (a `wait` fault on rank 0) after committing step 2;
meanwhile a second launch with the same arguments is refused (exit non-zero, naming the holder's
host, pid, SLURM job and heartbeat) and changes nothing in the directory, and `export-hf` reads the
live run's newest checkpoint (it takes no lock). Released, the first run finishes normally and
its lock is gone. A holder killed with kill -9 and taken over after the timeout:
test_faults_crash.py::test_kill_9_chain; a SLURM requeue: test_slurm_templates.py::
test_requeued_job_takes_over_its_lock_at_once; the lock's own logic: test_run_lock.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch import REPO, kill_group, run_trainer, tiny_args, trainer_command

from roberta_ds.checkpoint import commit as ckpt
from roberta_ds.launch.run_lock import LOCK_NAME, read_holder
from roberta_ds.quickstart.pipeline import launcher_env

pytestmark = pytest.mark.slow


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `root` but run.lock (its heartbeat moves): bytes and modification time."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def test_second_launch_is_refused_and_export_reads_the_live_run(small_tokenizer: Path, small_shards: Path,
                                                                  tmp_path: Path) -> None:
    out, gate, log = tmp_path / "run", tmp_path / "go", tmp_path / "first.log"
    args = tiny_args(small_tokenizer, small_shards, out, steps=4, extra=["--set", "save_interval=2"])
    env = {**launcher_env(), "PYTHONPATH": str(REPO), "ROBERTA_DS_FAULTS": f"wait={gate}@step:step=2,rank=0"}
    with open(log, "w") as f:
        first = subprocess.Popen(trainer_command(args, ranks=2), env=env, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True, cwd=str(REPO))
    try:
        deadline = time.monotonic() + 240
        while ckpt.tag_for(2) not in [c.tag for c in ckpt.committed(out / "checkpoints")]:
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        holder = read_holder(out / LOCK_NAME)
        assert holder is not None and holder.pid != first.pid  # rank 0 holds it, not the launcher
        before = snapshot(out)

        second = run_trainer(args, ranks=2, timeout=240)
        assert second.returncode not in (0, None), second.output[-4000:]
        assert (f"output_dir {out} is in use by another run: {out / LOCK_NAME} names host {holder.host}, "
                f"pid {holder.pid}, no SLURM job, last heartbeat ") in second.output, second.output[-4000:]
        assert "Traceback" not in second.output
        assert snapshot(out) == before and read_holder(out / LOCK_NAME).token == holder.token

        hf = tmp_path / "hf"
        command = [sys.executable, "-m", "roberta_ds.cli", "export-hf", "--checkpoint",
                   str(out / "checkpoints"), "--tokenizer", str(out / "tokenizer"), "--out", str(hf)]
        export = subprocess.run(command, env=launcher_env(), cwd=str(REPO), capture_output=True, text=True,
                                timeout=240, check=False)
        assert export.returncode == 0, export.stdout + export.stderr
        assert "max abs logit diff" in export.stdout and (hf / "model.safetensors").is_file()
        assert json.loads((hf / "config.json").read_text())["architectures"] == ["RobertaForMaskedLM"]
        assert snapshot(out) == before and read_holder(out / LOCK_NAME).token == holder.token

        gate.touch()
        assert first.wait(timeout=240) == 0, log.read_text()[-4000:]
    finally:
        kill_group(first.pid)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert ckpt.read_pointer(out / "checkpoints") == ckpt.tag_for(4)
    assert not (out / LOCK_NAME).exists()  # released at the clean exit
