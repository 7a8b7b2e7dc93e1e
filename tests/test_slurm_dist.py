"""Discovery on a real one-node SLURM cluster (started once per session by tests/cluster/slurm.py).

Each test runs tests/ds_scripts/dist_probe.py under a real launcher -- srun, srun --mpi=pmix,
mpirun inside and outside an allocation -- and checks every rank found its place, built a gloo
world of the promised size and all_reduced. Needs root and apt-get (CI has both); skips otherwise.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster.slurm import REPO, SlurmCluster, clean_env, slurm  # noqa: F401  (slurm: session fixture)

from roberta_ds.launch import dist

pytestmark = pytest.mark.slurm

PROBE = REPO / "tests" / "ds_scripts" / "dist_probe.py"
PY = shlex.quote(sys.executable)
# What every probe job needs: the venv's python first on PATH, CPU DeepSpeed, one thread per rank.
JOB_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
MPIRUN = "mpirun --allow-run-as-root --oversubscribe -np 2"


def probe_lines(out: str) -> list[dict[str, str]]:
    """The DIST_PROBE lines, one dict per rank, sorted by rank."""
    rows = [dict(kv.split("=", 1) for kv in line.split()[1:]) for line in out.splitlines()
            if line.startswith("DIST_PROBE ")]
    return sorted(rows, key=lambda d: int(d["rank"]))


def assert_world_of_two(out: str, source: str) -> list[dict[str, str]]:
    rows = probe_lines(out)
    assert [(r["rank"], r["world"], r["source"], r["allreduce"], r["ok"]) for r in rows] == [
        ("0", "2", source, "3.0", "1"), ("1", "2", source, "3.0", "1")], out
    assert [r["local_rank"] for r in rows] == ["0", "1"] and {r["local_world"] for r in rows} == {"2"}
    assert len({r["master"] for r in rows}) == 1, out                  # one rendezvous for both ranks
    return rows


def run_batch(slurm: SlurmCluster, body: str, *, name: str, args: tuple[str, ...] = ("-n", "2"),
              timeout: float = 120):
    return slurm.run_job("#!/bin/bash\nset -eu\n" + body, env=JOB_ENV, args=args, name=name, timeout=timeout)


def test_scontrol_expands_hostlists(slurm, monkeypatch):
    # discover() calls this for multi-node steps; here against the real scontrol (which, like any
    # SLURM client, needs the cluster's config: jobs inherit SLURM_CONF, this process gets it here).
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    env = slurm.env()
    out = subprocess.run(["scontrol", "show", "hostnames", "gpu[07-09],vm"], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["gpu07", "gpu08", "gpu09", "vm"]
    assert dist.scontrol_hostnames("n[1-2]") == ["n1", "n2"]


def test_srun_two_tasks_discover_slurm(slurm):
    # The trainer's path: deepspeed.init_distributed(auto_mpi_discovery=False) on our exported env.
    # On CPU that JIT-builds DeepSpeed's shm comm op once per TORCH_EXTENSIONS_DIR (~25 s idle, more
    # on a loaded machine) unless an earlier test built it: hence the long timeout.
    res = run_batch(slurm, f"srun --kill-on-bad-exit=1 {PY} {PROBE} --deepspeed\n", name="srun", timeout=400)
    assert res.state == "COMPLETED", slurm.describe(res.job_id)
    rows = assert_world_of_two(res.output, "slurm")
    host = slurm.run(["hostname", "-s"]).stdout.strip()
    # Step 0 of this job: the port is derived from the job id (no MASTER_PORT was set).
    assert rows[0]["master"] == f"{host}:{dist.slurm_port(res.job_id, 0)}", res.output


def test_srun_mpi_pmix_discovers_slurm_and_mpi_agrees(slurm):
    res = run_batch(slurm, f"srun --mpi=pmix --kill-on-bad-exit=1 {PY} {PROBE}\n", name="pmix")
    assert res.state == "COMPLETED", slurm.describe(res.job_id)
    assert_world_of_two(res.output, "slurm")
    # mpi4py (through PMIx) saw the same world of 2 on both ranks.
    assert res.output.count("mpi4py agrees with the srun step") == 2, res.output


def test_mpirun_inside_allocation_discovers_mpi(slurm):
    # Both mpirun children inherit the batch shell's SLURM_PROCID=0: discovery must use MPI.
    body = f'echo "batch SLURM_PROCID=$SLURM_PROCID"\n{MPIRUN} {PY} {PROBE}\n'
    res = run_batch(slurm, body, name="mpirun-in")
    assert res.state == "COMPLETED", slurm.describe(res.job_id)
    assert "batch SLURM_PROCID=0" in res.output
    assert_world_of_two(res.output, "mpi")


def test_mpirun_outside_allocation_discovers_mpi(slurm):
    cmd = [*shlex.split(MPIRUN), sys.executable, str(PROBE)]
    proc = subprocess.run(cmd, env=clean_env(JOB_ENV), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_world_of_two(proc.stdout, "mpi")


def test_forgotten_srun_is_caught_by_check_world(slurm):
    # sbatch -n 2 but the script runs python directly: one process, world 1, the job promised 2.
    res = run_batch(slurm, f"{PY} {PROBE}\n", name="no-srun")
    assert res.state == "FAILED", slurm.describe(res.job_id)
    assert "DIST_PROBE_ERROR" in res.output and "without `srun`" in res.output, res.output


def test_rank_exported_in_batch_script_is_refused(slurm):
    # The classic mistake: RANK taken from the batch shell (SLURM_PROCID=0 there) is inherited by
    # every task of the step; task 1 refuses, srun --kill-on-bad-exit ends task 0.
    body = ("export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 "
            "MASTER_PORT=29999\n"
            f"srun --kill-on-bad-exit=1 {PY} {PROBE}\n")
    res = run_batch(slurm, body, name="stale-rank")
    assert res.state == "FAILED", slurm.describe(res.job_id)
    assert "contradictory environment: RANK=0" in res.output and "SLURM_PROCID" in res.output, res.output


def test_harness_signal_and_requeue(slurm, tmp_path):
    # The helpers later sbatch-template tests rely on: submit from a directory, wait for RUNNING,
    # deliver a signal to the batch shell, requeue and run again (SLURM_RESTART_COUNT counts).
    body = ("trap 'echo got USR1 restart=${SLURM_RESTART_COUNT:-0} in $PWD; exit 0' USR1\n"
            "echo start restart=${SLURM_RESTART_COUNT:-0} submit=$SLURM_SUBMIT_DIR\n"
            "for i in $(seq 600); do sleep 0.1; done\n")   # short sleeps: bash runs traps between them
    job = slurm.sbatch(body, args=["-n", "1", "--open-mode=append"], name="harness", cwd=tmp_path)
    for restart in (0, 1):
        assert slurm.wait(job, 60, until={"RUNNING"}) == "RUNNING", slurm.describe(job)
        for _ in range(50):    # the trap is set once the shell has printed "start"
            if f"start restart={restart}" in slurm.output(job):
                break
            time.sleep(0.1)
        slurm.scancel(job, "--batch", "--signal=USR1")
        assert slurm.wait(job, 60) == "COMPLETED", slurm.describe(job)
        assert f"got USR1 restart={restart} in {tmp_path}" in slurm.output(job), slurm.describe(job)
        if restart == 0:
            slurm.requeue(job)
    out = slurm.output(job)       # --open-mode=append: both runs in one file
    assert out.count(f"submit={tmp_path}") == 2 and "start restart=1" in out, out
    assert str(job) in slurm.squeue("-h", "-t", "all", "-o", "%i").split()
