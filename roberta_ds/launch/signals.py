"""Preemption signals only set a flag; the training loop acts on it at an optimizer-step boundary.

SLURM (`--signal`, `scancel --signal`), Kubernetes and most schedulers send SIGTERM or SIGUSR1/2
some time before killing a job. A handler that saved immediately could run in the middle of a
step or of a collective; instead every rank records the signal, the loop max-reduces the flag at
the next step boundary so all ranks agree, and they save one checkpoint together. Further signals
(a second SIGTERM during the save) change nothing.

Schedulers often signal every process of the job, DataLoader workers included, and torch's
workers die on SIGTERM; the next batch would then fail the rank instead of letting it save. So
workers are started inside `children_ignore_stop_signals()`: they inherit a signal mask that
blocks the stop signals. They still end normally (the loop closes its loader), with their parent
(torch's workers watch it), on SIGKILL, and at interpreter exit (where multiprocessing would
otherwise SIGTERM them and wait forever, an exit hook SIGKILLs them first).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import signal
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


_shielded: list[multiprocessing.process.BaseProcess] = []


@contextlib.contextmanager
def children_ignore_stop_signals() -> Iterator[None]:
    """Processes forked inside this block never receive the stop signals (a blocked mask is inherited).

    In this process they are only held back until the block ends, then delivered to the handler.
    """
    before = set(multiprocessing.active_children())
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        new = [p for p in multiprocessing.active_children() if p not in before]
        if new and not _shielded:
            atexit.register(_kill_shielded)  # runs before multiprocessing's own exit hook (LIFO)
        _shielded.extend(new)


def _kill_shielded() -> None:
    alive = [p for p in _shielded if p.is_alive()]
    if alive:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would call this death an error
        for p in alive:
            p.kill()
            p.join(5)


class StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None

    @classmethod
    def install(cls, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> "StopFlag":
        flag = cls()
        for s in signals:
            signal.signal(s, flag._handle)
        return flag

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def value(self) -> float:
        return 0.0 if self.signum is None else 1.0

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"
