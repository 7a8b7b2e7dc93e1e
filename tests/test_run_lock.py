"""run_lock.py in processes of its own (no trainer): create, refuse, heartbeat, release, take over a
holder killed with kill -9 once its heartbeat is older than the timeout, take over at once for a
requeue of the same SLURM job, and one winner among launches taking over a stale lock together.
The same lock in real launches: tests/test_run_lock_launches.py, test_faults_crash.py::test_kill_9_chain
and (SLURM requeue) test_slurm_templates.py::test_requeued_job_takes_over_its_lock_at_once.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from roberta_ds.launch.run_lock import (
    LOCK_NAME,
    Holder,
    RunLock,
    RunLockError,
    read_holder,
    replace,
    this_process,
    verdict,
)

REPO = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()


def _holder(**changes) -> Holder:
    return dataclasses.replace(this_process(300.0, environ={}, now=1000.0), **changes)


def test_verdict() -> None:
    job = {"slurm_job_id": "42", "slurm_cluster": "c1"}
    me = _holder(**job, slurm_restart=1, heartbeat=1000.0)
    fresh, old = 1000.0 - 10, 1000.0 - 301
    assert verdict(_holder(heartbeat=fresh), me, 1000.0, 300) == "refuse"
    assert verdict(_holder(heartbeat=old), me, 1000.0, 300) == "stale"
    # The holder's own beat bounds it too: never stale before 3 of its beats were missed.
    assert verdict(_holder(heartbeat=1000.0 - 20, interval_s=10), me, 1000.0, 5) == "refuse"
    assert verdict(_holder(heartbeat=1000.0 - 31, interval_s=10), me, 1000.0, 5) == "stale"
    # The same SLURM job, requeued (higher restart count): at once. The same job and restart (a second
    # launch inside one job), another job, or the same id on another cluster: only when stale.
    assert verdict(_holder(**job, slurm_restart=0, heartbeat=fresh), me, 1000.0, 300) == "requeue"
    assert verdict(_holder(**job, slurm_restart=1, heartbeat=fresh), me, 1000.0, 300) == "refuse"
    for job_id, cluster in (("43", "c1"), ("42", "c2")):
        other = _holder(slurm_job_id=job_id, slurm_cluster=cluster, slurm_restart=0, heartbeat=fresh)
        assert verdict(other, me, 1000.0, 300) == "refuse"


def test_acquire_refuse_release(tmp_path: Path) -> None:
    out = tmp_path / "run"
    lock = RunLock.acquire(out, 300.0, environ={"SLURM_JOB_ID": "7", "SLURM_CLUSTER_NAME": "c1"})
    held = read_holder(out / LOCK_NAME)
    assert (held.host, held.pid, held.slurm_job_id, held.slurm_cluster, held.token) == (
        HOST, os.getpid(), "7", "c1", lock.me.token)
    with pytest.raises(RunLockError) as e:
        RunLock.acquire(out, 300.0, environ={})
    message = str(e.value)
    assert message.startswith(f"output_dir {out} is in use by another run: {out / LOCK_NAME} names host "
                              f"{HOST}, pid {os.getpid()}, SLURM job 7 on cluster c1 (restart 0), last "
                              "heartbeat 20")
    assert "lock_timeout_s = 300 s" in message and f"delete {out / LOCK_NAME}" in message
    assert read_holder(out / LOCK_NAME) == held  # the refused launch changed nothing
    lock.release()
    assert not (out / LOCK_NAME).exists()
    assert sorted(p.name for p in out.iterdir()) == []  # no temp or claim files left
    again = RunLock.acquire(out, 300.0, environ={})
    # A release by a process that lost the lock leaves the new holder's file alone.
    replace(out / LOCK_NAME, _holder(pid=1, heartbeat=time.time()))
    again.release()
    assert read_holder(out / LOCK_NAME).pid == 1


def test_a_file_that_is_not_a_lock_is_refused(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text("hello")
    with pytest.raises(RunLockError, match=rf"{tmp_path / LOCK_NAME}: not a lock file written by roberta-ds"):
        RunLock.acquire(tmp_path, 300.0)


def test_heartbeat_advances_and_a_takeover_stops_the_old_holder(tmp_path: Path) -> None:
    lock = RunLock.acquire(tmp_path, 0.5)
    lost: list[str] = []
    lock.start_heartbeat(on_lost=lost.append)
    first = read_holder(tmp_path / LOCK_NAME).heartbeat
    deadline = time.monotonic() + 30
    while read_holder(tmp_path / LOCK_NAME).heartbeat == first:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    other = _holder(pid=4242, heartbeat=time.time())
    replace(tmp_path / LOCK_NAME, other)  # what a taker does
    while not lost:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert lost[0].startswith(f"{tmp_path / LOCK_NAME} was taken over; it now names host {HOST}, "
                              "pid 4242,")
    assert read_holder(tmp_path / LOCK_NAME) == other  # the old holder never wrote over it
    lock.release()
    assert read_holder(tmp_path / LOCK_NAME) == other


HOLDER_SCRIPT = """
import sys, time
from pathlib import Path
from roberta_ds.launch.run_lock import RunLock
lock = RunLock.acquire(Path(sys.argv[1]), 1.0)
lock.start_heartbeat(on_lost=print)
print("held", flush=True)
time.sleep(600)
"""


def test_holder_killed_with_kill_9_is_taken_over_after_the_timeout(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, str(out)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline() == "held\n"
        first = read_holder(out / LOCK_NAME)
        while read_holder(out / LOCK_NAME).heartbeat == first.heartbeat:  # it beats every 0.1 s
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    dead = read_holder(out / LOCK_NAME)
    assert dead.pid == proc.pid
    # Dead, but not yet known to be: a launch with a long timeout is refused, naming the holder.
    with pytest.raises(RunLockError,
                       match=rf"names host {HOST}, pid {proc.pid}, no SLURM job, last heartbeat"):
        RunLock.acquire(out, 60.0)
    while time.time() - dead.heartbeat <= 1.0:
        time.sleep(0.05)
    logs: list[str] = []
    lock = RunLock.acquire(out, 1.0, log=logs.append)
    assert read_holder(out / LOCK_NAME) == lock.me
    assert len(logs) == 1 and logs[0].startswith(
        f"[roberta-ds] took over {out / LOCK_NAME} from host {HOST}, pid {proc.pid}, no SLURM job, "
        "last heartbeat ")
    assert logs[0].endswith("its heartbeat is older than lock_timeout_s = 1 s")
    lock.release()


def test_a_requeued_slurm_job_takes_its_lock_over_at_once(tmp_path: Path) -> None:
    job = {"SLURM_JOB_ID": "42", "SLURM_CLUSTER_NAME": "c1"}
    old = RunLock.acquire(tmp_path, 300.0, environ={**job, "SLURM_RESTART_COUNT": "0"})
    old.released = True  # as if killed: the file stays, its heartbeat fresh
    with pytest.raises(RunLockError, match="SLURM job 42 on cluster c1 \\(restart 0\\)"):
        RunLock.acquire(tmp_path, 300.0, environ={**job, "SLURM_RESTART_COUNT": "0"})
    logs: list[str] = []
    new = RunLock.acquire(tmp_path, 300.0, environ={**job, "SLURM_RESTART_COUNT": "1"}, log=logs.append)
    assert read_holder(tmp_path / LOCK_NAME).token == new.me.token
    assert logs[0].endswith("the same SLURM job 42, requeued (restart 0 -> 1)")
    new.release()


def _contender(out: str, start, done, results) -> None:
    start.wait()
    try:
        RunLock.acquire(Path(out), 1.0, log=lambda message: None)
        results.put(("won", os.getpid()))
    except RunLockError as e:
        results.put(("refused", str(e)))
    done.wait()  # hold the lock until every contender has tried (our exit releases it)


@pytest.mark.parametrize("round_", range(8))
def test_launches_taking_over_a_stale_lock_together_have_one_winner(tmp_path: Path, round_: int) -> None:
    out = tmp_path / "run"
    out.mkdir()
    replace(out / LOCK_NAME, _holder(pid=1, heartbeat=time.time() - 100, interval_s=0.1))
    n = 6
    ctx = multiprocessing.get_context("fork")
    start, done, results = ctx.Barrier(n), ctx.Barrier(n + 1), ctx.Queue()
    procs = [ctx.Process(target=_contender, args=(str(out), start, done, results)) for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in range(n)]
    winners = [pid for kind, pid in outcomes if kind == "won"]
    holder = read_holder(out / LOCK_NAME)
    done.wait()
    for p in procs:
        p.join(30)
    assert len(winners) == 1, outcomes
    assert holder.pid == winners[0]
    refusals = [m for kind, m in outcomes if kind == "refused"]
    assert all("is in use by another run" in m or "another launch is taking over" in m
               for m in refusals), refusals
    assert not list(out.glob(f"{LOCK_NAME}.takeover-*")) and not list(out.glob(".*.tmp"))


def test_a_directory_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"  # under a regular file: mkdir fails (as root too)
    with pytest.raises(RunLockError,
                       match=rf"^output_dir {out}: cannot take the run lock {out / LOCK_NAME} \("):
        RunLock.acquire(out, 300.0)
