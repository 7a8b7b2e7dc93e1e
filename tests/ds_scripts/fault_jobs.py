"""Shared pieces of the fault-injection tests (tests/test_faults_*.py): jobs, the reference run, checks.

- `launch_job`: run the trainer under a launcher in its own session and process group, like
  tests/launch.py, but wait for the launcher alone (output goes to a file, so a rank that outlives
  the launcher cannot hold the test up) and then list what the job left behind: its processes
  still alive, and DeepSpeed's CPU all-reduce buffers in /dev/shm (69 MB per rank; the trainer
  unlinks them at start, so even a killed job leaves none). Whatever is left is removed afterwards.
- `reference_run`: ONE uninterrupted 2-rank run (8 steps, a checkpoint every 2 steps, a NaN loss
  on rank 1 at step index 2 and an Inf gradient on rank 0 at index 3), computed once per test
  session and shared by the crash, non-finite, signal and file tests. Every run compared with it
  uses the same arguments and the same value faults (`VALUE_FAULTS`), so equal losses mean an
  exact continuation, skipped steps included.
- `state_tensors`: every tensor of a checkpoint (bf16 module, fp32 master partitions, Adam moments
  and step counters), read through the weights-only unpickler, for bitwise comparisons.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch
from launch import Result, free_port, tiny_args, trainer_command

from roberta_ds.checkpoint import commit as ckpt
from roberta_ds.comm import Comm
from roberta_ds.durable import _safe_globals
from roberta_ds.quickstart.pipeline import launcher_env

REPO = Path(__file__).resolve().parents[2]
STEPS = 8
SAVE_EVERY = 2
VALUE_FAULTS = "nan@loss:step=2,rank=1; inf@grad:step=3,rank=0"
"""Fired in the reference run and in every run compared with it (the filters are step indices, so a
resumed run past them never fires them)."""
TIMEOUT_S = 15
"""collective_timeout_s in the fault tests: small, but with margin for a loaded 2-core machine."""
LOCK_TIMEOUT_S = 2
"""lock_timeout_s in the fault tests: a job killed with kill -9 leaves its run.lock, taken over by the
next launch once the heartbeat is this old (`wait_until_lock_is_stale`)."""
LAUNCH_TIMEOUT = 240
"""Kill a job that has not ended by then (a hang the test itself must report)."""


def fault_args(tokenizer: Path, shards: Path, out: Path, *, steps: int = STEPS, extra: list[str] = (),
               **kw) -> list[str]:
    """The tiny-model arguments of every fault test: checkpoints every 2 steps, none pruned, timeouts
    15 s (collectives) and 2 s (the run lock)."""
    return tiny_args(tokenizer, shards, out, steps=steps, extra=[
        "--set", f"save_interval={SAVE_EVERY}", "--set", "keep_last=100",
        "--set", f"collective_timeout_s={TIMEOUT_S}", "--set", f"lock_timeout_s={LOCK_TIMEOUT_S}",
        *extra], **kw)


def wait_until_lock_is_stale(out: Path, timeout_s: float = LOCK_TIMEOUT_S):
    """The run.lock a killed job left in `out` (a run_lock.Holder), once its heartbeat is older than
    `timeout_s`, so that the next launch takes it over; None when there is no lock."""
    from roberta_ds.launch.run_lock import LOCK_NAME, read_holder

    holder = read_holder(out / LOCK_NAME)
    if holder is not None:
        time.sleep(max(0.0, holder.heartbeat + timeout_s + 0.2 - time.time()))
        assert read_holder(out / LOCK_NAME) == holder, "the killed job's lock changed: something still runs"
    return holder


def took_over(job: Job, holder, timeout_s: float = LOCK_TIMEOUT_S) -> bool:
    """Whether the job's log says it took over the lock `holder` left because its heartbeat was stale."""
    return any(f"took over {job.out_dir / 'run.lock'} from host {holder.host}, pid {holder.pid}, " in line
               and line.endswith(f"its heartbeat is older than lock_timeout_s = {timeout_s:g} s")
               for line in job.output.splitlines())


@dataclass
class Job(Result):
    """launch.Result (output, metrics, losses) plus what the job left behind."""

    returncode: int | None
    """The launcher's exit status (None: killed by the test at LAUNCH_TIMEOUT)."""
    orphans: list[str] = field(default_factory=list)
    """Processes of the job's group still alive `orphan_grace` seconds after the launcher exited, and
    shared-memory files of the job left in /dev/shm."""

    def tail(self, n: int = 6000) -> str:
        return f"exit {self.returncode} after {self.seconds:.0f}s; output:\n{self.output[-n:]}"


def _group_members(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return out


def launch_job(args: list[str], *, ranks: int = 2, launcher: str = "deepspeed", faults: str = "",
               env: dict[str, str] | None = None, timeout: float = LAUNCH_TIMEOUT, orphan_grace: float = 15.0,
               log: Path | None = None) -> Job:
    """Run the trainer; wait for the launcher; then up to `orphan_grace` s for the rest of its group."""
    full_env = launcher_env()
    full_env.update(env or {})
    full_env["ROBERTA_DS_FAULTS"] = faults
    full_env.setdefault("PYTHONPATH", str(REPO))
    out_dir = next((Path(a.split("=", 1)[1]) for a in args if a.startswith("output_dir=")), None)
    log = log or Path(os.environ.get("TMPDIR", "/tmp")) / f"fault_job_{os.getpid()}_{time.monotonic_ns()}.log"
    port = free_port()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(trainer_command(args, ranks=ranks, launcher=launcher, port=port), env=full_env,
                                stdout=f, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                cwd=str(REPO))
    try:
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        seconds = time.perf_counter() - t0
        deadline = time.monotonic() + orphan_grace
        alive = _group_members(proc.pid)
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = _group_members(proc.pid)
        orphans = []
        for p in alive:
            try:
                orphans.append(f"{p.pid} {' '.join(p.cmdline())[:200]}")
            except psutil.Error:
                continue
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    for shm in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        orphans.append(f"/dev/shm/{shm.name}")
        shm.unlink(missing_ok=True)
    output = log.read_text(errors="replace")
    log.unlink(missing_ok=True)
    if code is None:
        output += f"\n[fault_jobs] the job was still running after {timeout}s and was killed by the test"
    return Job(code, output, out_dir, seconds, orphans)


# ----------------------------------------------------------------------------------------------
# The reference run, once per session

_REFERENCE: dict[tuple[str, str], Job] = {}


def reference_run(tmp_path_factory: pytest.TempPathFactory, tokenizer: Path, shards: Path) -> Job:
    """The uninterrupted run every crash/resume test compares with (see the module docstring)."""
    key = (str(tokenizer), str(shards))
    if key not in _REFERENCE:
        out = tmp_path_factory.mktemp("fault_reference") / "run"
        job = launch_job(fault_args(tokenizer, shards, out), faults=VALUE_FAULTS)
        assert job.returncode == 0, job.tail()
        assert sorted(job.losses()) == list(range(1, STEPS + 1)), job.tail()
        _REFERENCE[key] = job
    return _REFERENCE[key]


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a run directory (tests corrupt or resume copies, never the shared original)."""
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


# ----------------------------------------------------------------------------------------------
# Checks


def plan_here(run: Path, fallback: bool, log: list[str] | None = None, resume: str = "auto"):
    """resume.plan_resume as the trainer calls it, in this one process (world size 1: a checkpoint
    of 2 ranks resumes through a universal conversion)."""
    from roberta_ds.checkpoint.resume import plan_resume

    logs = log if log is not None else []
    return plan_resume(run / "checkpoints", resume, fallback, Comm.single(), zero_stage=2,
                       check=lambda c: None, log=logs.append)


def tag_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / ckpt.tag_for(step)


def resumed_from(job: Job) -> int | None:
    """The step the run says it resumed from, or None when it started fresh."""
    for line in job.output.splitlines():
        if "[roberta-ds] resumed from " in line:
            return int(line.split(" at step ")[1].split()[0])
    return None


def assert_losses_match(job: Job, reference: Job, steps: range) -> None:
    """The job's losses at `steps` are bitwise those of the reference (NaN where the reference has NaN)."""
    got, want = job.losses(), reference.losses()
    for s in steps:
        assert s in got, f"step {s} missing from the job's metrics\n{job.tail()}"
        a, b = got[s], want[s]
        same = (a == b) or (math.isnan(a) and math.isnan(b))
        assert same, f"step {s}: loss {a!r}, uninterrupted run {b!r}\n{job.tail(3000)}"


def state_tensors(tag: Path) -> dict[str, torch.Tensor]:
    """{file/key path: tensor} of every tensor in a checkpoint's DeepSpeed files."""
    out: dict[str, torch.Tensor] = {}

    def walk(obj: object, name: str) -> None:
        if torch.is_tensor(obj):
            out[name] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}[{i}]")

    with torch.serialization.safe_globals(_safe_globals()):
        for path in sorted(tag.glob("*.pt")):
            walk(torch.load(path, map_location="cpu", weights_only=True), path.name)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def assert_bitwise_equal_states(a: Path, b: Path) -> None:
    """Every tensor of checkpoint `a` has exactly the bits of the same tensor of `b` (NaN included)."""
    ta, tb = state_tensors(a), state_tensors(b)
    assert sorted(ta) == sorted(tb)
    assert len(ta) > 10
    differ = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(_bits(ta[k]), _bits(tb[k]))]
    assert not differ, f"{a.name} vs {b.name}: tensors differ: {differ[:6]}"
