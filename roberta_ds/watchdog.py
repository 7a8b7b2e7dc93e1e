"""Who did not arrive: per-rank progress in the process group's key-value store, read after a failure.

Every rank records the step it is entering (`Progress.mark`, one small store write per optimizer
step). When a collective times out (gloo and NCCL raise after the process group's timeout), the
rank that caught it reads every rank's last mark and names the ones behind: "rank 1 did not
arrive at step 7 (last seen at step 6)". If the store itself does not answer (its host, rank 0,
is the one hung), that is named instead.
"""

from __future__ import annotations

from datetime import timedelta

import torch

_PREFIX = "roberta_ds/progress/"


def is_collective_failure(exc: BaseException) -> bool:
    """A timed-out or broken collective (peer hung, killed, or crashed), as gloo/NCCL report it."""
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(exc).lower()
    markers = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
               "peer", "nccl", "gloo", "socket")
    return isinstance(exc, dist_error) or (isinstance(exc, RuntimeError) and any(m in text for m in markers))


class Progress:
    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world = rank, world_size
        self.seq = 0
        self.store = None
        if torch.distributed.is_available() and torch.distributed.is_initialized() and world_size > 1:
            try:
                from torch.distributed.distributed_c10d import _get_default_store

                self.store = _get_default_store()
            except Exception:  # noqa: BLE001 - diagnostics only; training does not depend on it
                self.store = None

    def mark(self, step: int, phase: str) -> None:
        """Record that this rank reached `phase` of `step`; every rank passes the same marks in order."""
        self.seq += 1
        if self.store is not None:
            self.store.set(f"{_PREFIX}{self.rank}", f"{self.seq}|{step}|{phase}")

    def diagnose(self, read_timeout_s: float = 5.0) -> str:
        """Name the ranks behind the furthest one (all ranks pass the same sequence of marks)."""
        if self.store is None:
            return "no progress store (single process)"
        try:
            self.store.set_timeout(timedelta(seconds=read_timeout_s))
            seen: dict[int, tuple[int, str]] = {}
            for r in range(self.world):
                key = f"{_PREFIX}{r}"
                if self.store.check([key]):
                    seq, step, phase = self.store.get(key).decode().split("|", 2)
                    seen[r] = (int(seq), f"step {step} {phase}")
                else:
                    seen[r] = (-1, "never reported")
        except Exception as e:  # noqa: BLE001
            return (f"the progress store on rank 0 did not answer ({type(e).__name__}): rank 0 is likely "
                    "the rank that hung or died")
        front = max(seq for seq, _ in seen.values())
        behind = {r: v for r, v in seen.items() if v[0] < front}
        ahead = next(where for seq, where in seen.values() if seq == front)
        if not behind:
            return f"every rank reached {ahead}; the failure happened inside that phase"
        names = ", ".join(f"rank {r} (last at {where})" for r, (_, where) in sorted(behind.items()))
        return f"ranks that did not arrive at {ahead}: {names}"
