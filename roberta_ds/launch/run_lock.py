"""One run per output directory: `<output_dir>/run.lock`, held by rank 0 for the run's whole life.

Two runs in one directory mix their checkpoints and metrics.jsonl (a job resubmitted while the old
one still runs, a requeue while old processes linger). So the trainer's rank 0 takes the lock before
anything reads or writes the directory, and every rank stops if it cannot:

    lock = RunLock.acquire(Path("runs/base"), timeout_s=300, log=print)    # or RunLockError
    lock.start_heartbeat(on_lost=...)
    ...
    lock.release()                                                            # also at interpreter exit

The lock file is JSON: host, pid, SLURM cluster, job id and restart count, a random token, the start
time and a heartbeat time that a thread of the holder rewrites every `heartbeat_interval(timeout_s)`
seconds. It works on a filesystem shared by the nodes (NFS, Lustre, GPFS) because every change is
one atomic namespace operation:
- create: the content is written to a unique temp file, then `link(temp, run.lock)`, which fails if
  run.lock exists (O_EXCL semantics; link is what open(2) recommends where O_EXCL is not atomic on
  NFS, and the lock never appears half-written); a lost reply is caught by the temp file's link count;
- heartbeat: the holder reads run.lock, checks that the token is still its own, and renames a fresh
  copy over it. If the token is another's, the run was taken over: `on_lost` stops this run;
- take over: allowed when the holder's heartbeat is older than `timeout_s` (and than 3 of its own
  beats), or at once when the holder is this very SLURM job before a requeue (same cluster and job id,
  lower restart count). The taker first creates `run.lock.takeover-<holder token>` with link: of
  launches that judged the same holder dead at the same moment, one gets it and the others are
  refused. The winner re-reads run.lock (still that holder?) and renames its own over it;
- release: at a clean exit, an error exit, exit 75 (preemption), or an error on rank 0, the holder
  unlinks run.lock if the token is still its own. After `kill -9` (or a node lost) the lock stays and
  is taken over once its heartbeat is older than the timeout.
Ages compare the holder's wall clock with the taker's: the nodes' clocks must agree (NTP) to well
within the timeout, which must also exceed the filesystem's attribute-cache time (NFS: up to 60 s).
Readers (`export-hf`, `inspect`) take no lock.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from roberta_ds.durable import fsync_dir
from roberta_ds.errors import UserError

LOCK_NAME = "run.lock"
TAKEOVER_PREFIX = f"{LOCK_NAME}.takeover-"
MAX_BEAT_S = 30.0
STALE_BEATS = 3
"""A holder is never presumed dead before it has missed this many of its own heartbeats."""


class RunLockError(UserError):
    """The output directory is held by another run (or its lock cannot be read or written)."""


@dataclass(frozen=True)
class Holder:
    """The content of run.lock."""

    host: str
    pid: int
    slurm_job_id: str | None
    slurm_cluster: str | None
    slurm_restart: int
    token: str
    started: float
    heartbeat: float
    """Unix time of the holder's latest heartbeat."""
    interval_s: float
    """The holder's heartbeat period."""

    def describe(self, now: float) -> str:
        job = f"SLURM job {self.slurm_job_id}" if self.slurm_job_id else "no SLURM job"
        if self.slurm_job_id and self.slurm_cluster:
            job += f" on cluster {self.slurm_cluster}"
        if self.slurm_job_id:
            job += f" (restart {self.slurm_restart})"
        beat = datetime.fromtimestamp(self.heartbeat, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        age = now - self.heartbeat
        return f"host {self.host}, pid {self.pid}, {job}, last heartbeat {beat} ({age:.0f} s ago)"


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between heartbeats: a tenth of the timeout, at most 30 s."""
    return min(MAX_BEAT_S, timeout_s / 10)


def this_process(timeout_s: float, environ: dict[str, str] | None = None, now: float | None = None) -> Holder:
    env = os.environ if environ is None else environ
    t = time.time() if now is None else now
    return Holder(host=socket.gethostname(), pid=os.getpid(), slurm_job_id=env.get("SLURM_JOB_ID") or None,
                  slurm_cluster=env.get("SLURM_CLUSTER_NAME") or None,
                  slurm_restart=int(env.get("SLURM_RESTART_COUNT") or 0), token=secrets.token_hex(16),
                  started=t, heartbeat=t, interval_s=heartbeat_interval(timeout_s))


def verdict(holder: Holder, me: Holder, now: float, timeout_s: float) -> str:
    """What a launch may do about a lock held by `holder`: "requeue" (the same SLURM job, requeued:
    take over at once), "stale" (the heartbeat is older than the timeout: take over) or "refuse"."""
    same_job = (holder.slurm_job_id is not None and holder.slurm_job_id == me.slurm_job_id
                and holder.slurm_cluster == me.slurm_cluster)
    if same_job and me.slurm_restart > holder.slurm_restart:
        return "requeue"
    if now - holder.heartbeat > max(timeout_s, STALE_BEATS * holder.interval_s):
        return "stale"
    return "refuse"


# ----------------------------------------------------------------------------------------------
# The file operations (each one atomic in the namespace)


def _encode(holder: Holder) -> bytes:
    return (json.dumps(asdict(holder), indent=1) + "\n").encode()


def read_holder(path: Path) -> Holder | None:
    """The holder named by the lock file `path`, or None when there is none. Raises RunLockError for a
    file that is not a lock (run.lock is only ever written whole: nothing of ours leaves it partial)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError) as e:
        raise RunLockError(f"{path}: not a lock file written by roberta-ds ({e}); if no run uses "
                           f"{path.parent}, delete it") from None


def _temp_copy(path: Path, holder: Holder) -> Path:
    tmp = path.with_name(f".{path.name}.{holder.host}.{holder.pid}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, _encode(holder))
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # a directory fsync is not supported everywhere: the lock still holds
        fsync_dir(path)


def create_exclusive(path: Path, holder: Holder) -> bool:
    """Create `path` holding `holder` if it does not exist; True when this call created it."""
    tmp = _temp_copy(path, holder)
    try:
        try:
            os.link(tmp, path)
            created = True
        except FileExistsError:
            created = False
        except OSError:
            created = os.stat(tmp).st_nlink == 2  # NFS: the link was made but the reply was lost
        if created:
            _fsync_dir(path.parent)
        return created
    finally:
        tmp.unlink(missing_ok=True)


def replace(path: Path, holder: Holder) -> None:
    """Make `path` hold `holder`, atomically (rename over it)."""
    tmp = _temp_copy(path, holder)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


# ----------------------------------------------------------------------------------------------


def _refusal(path: Path, holder: Holder, now: float, timeout_s: float) -> str:
    return (f"output_dir {path.parent} is in use by another run: {path} names {holder.describe(now)}. "
            "Two runs in one directory would mix their checkpoints and metrics.jsonl; wait for that run "
            "to end or choose another output_dir. If it died, its lock is taken over once the heartbeat "
            f"is older than lock_timeout_s = {timeout_s:g} s (a requeue of the same SLURM job takes it at "
            f"once); if you are sure no run uses the directory, delete {path}")


class RunLock:
    """The held lock of one output directory (see the module docstring)."""

    def __init__(self, path: Path, me: Holder) -> None:
        self.path, self.me = path, me
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.released = False

    @classmethod
    def acquire(cls, out_dir: Path, timeout_s: float, log: Callable[[str], Any] = print,
                environ: dict[str, str] | None = None) -> RunLock:
        """Take `out_dir`'s lock (creating the directory), or raise RunLockError naming the holder."""
        try:
            return cls._acquire(out_dir, timeout_s, log, environ)
        except OSError as e:  # a read-only or full filesystem, no permission: say where
            raise RunLockError(f"output_dir {out_dir}: cannot take the run lock {out_dir / LOCK_NAME} "
                               f"({e.strerror or e})") from None

    @classmethod
    def _acquire(cls, out_dir: Path, timeout_s: float, log: Callable[[str], Any],
                 environ: dict[str, str] | None) -> RunLock:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / LOCK_NAME
        me = this_process(timeout_s, environ)
        for _ in range(5):  # each retry follows a change made by another launch meanwhile
            if create_exclusive(path, me):
                return cls._held(path, me)
            holder = read_holder(path)
            if holder is None:
                continue  # released between our create and our read
            now = time.time()
            why = verdict(holder, me, now, timeout_s)
            if why == "refuse":
                raise RunLockError(_refusal(path, holder, now, timeout_s))
            claim = path.with_name(TAKEOVER_PREFIX + holder.token)
            if not create_exclusive(claim, me):
                raise RunLockError(
                    f"output_dir {out_dir}: another launch is taking over {path} (held by "
                    f"{holder.describe(now)}) at this moment ({claim}); if that file is older than a minute, "
                    "a launch died while taking over: delete it and launch again")
            try:
                if read_holder(path) != holder:
                    continue  # it changed meanwhile (a heartbeat, a release, another taker): look again
                me = this_process(timeout_s, environ)  # a fresh heartbeat time
                replace(path, me)
            finally:
                claim.unlink(missing_ok=True)
            if why == "requeue":
                reason = (f"the same SLURM job {holder.slurm_job_id}, requeued (restart "
                          f"{holder.slurm_restart} -> {me.slurm_restart})")
            else:
                reason = f"its heartbeat is older than lock_timeout_s = {timeout_s:g} s"
            log(f"[roberta-ds] took over {path} from {holder.describe(now)}: {reason}")
            return cls._held(path, me)
        raise RunLockError(f"{path}: could not take the lock; other launches keep changing it")

    @classmethod
    def _held(cls, path: Path, me: Holder) -> RunLock:
        lock = cls(path, me)
        _HELD.append(lock)
        return lock

    def owned(self) -> tuple[bool, Holder | None]:
        """(whether run.lock still names this process, who it names)."""
        try:
            holder = read_holder(self.path)
        except RunLockError:
            return False, None
        return holder is not None and holder.token == self.me.token, holder

    def start_heartbeat(self, on_lost: Callable[[str], Any], log: Callable[[str], Any] = print) -> None:
        """Refresh the heartbeat from a daemon thread; call `on_lost(message)` once if another launch took
        the lock over (this run must then stop writing into the directory)."""

        def beat() -> None:
            failing = False
            while not self._stop.wait(self.me.interval_s):
                try:
                    mine, holder = self.owned()
                    if not mine:
                        now = time.time()
                        who = holder.describe(now) if holder else "nobody (the file is gone or unreadable)"
                        on_lost(f"{self.path} was taken over; it now names {who}. Stopping this run so that "
                                f"two runs do not write into {self.path.parent}")
                        return
                    self.me = dataclasses.replace(self.me, heartbeat=time.time())
                    replace(self.path, self.me)
                    failing = False
                except OSError as e:  # a full disk, a filesystem hiccup: keep trying; the lock stays ours
                    if not failing:
                        log(f"[roberta-ds] warning: cannot refresh the heartbeat of {self.path} ({e}); "
                            "retrying")
                    failing = True

        self._thread = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove run.lock if it is still ours (idempotent)."""
        if self.released:
            return
        self.released = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with contextlib.suppress(OSError):
            if self.owned()[0]:
                self.path.unlink()


_HELD: list[RunLock] = []


def release_held() -> None:
    """Release every lock this process holds: at exit, and on the trainer's fatal-error path."""
    for lock in _HELD:
        lock.release()


atexit.register(release_held)
