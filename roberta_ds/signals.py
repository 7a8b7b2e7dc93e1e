"""Preemption signals only set a flag; the training loop acts on it at an optimizer-step boundary.

SLURM (`--signal`, `scancel --signal`), Kubernetes and most schedulers send SIGTERM or SIGUSR1/2
some time before killing a job. A handler that saved immediately could run in the middle of a
step or of a collective; instead every rank records the signal, the loop max-reduces the flag at
the next step boundary so all ranks agree, and they save one checkpoint together. Further signals
(a second SIGTERM during the save) change nothing.
"""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


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
