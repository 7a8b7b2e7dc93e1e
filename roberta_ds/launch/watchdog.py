"""Who did not arrive: per-rank progress in the process group's key-value store, read after a failure.

Every rank records the phase it is entering (`Progress.mark`: a store write at the start of
each optimizer step, its optimizer phase, saves and evaluations; the micro-batches in between are
published by the heartbeat thread) and, from a daemon thread, a heartbeat counter every
HEARTBEAT_S seconds. When a
collective times out (gloo and NCCL raise after the process group's timeout) or breaks (a peer
died), the rank that caught it reads every rank's last mark and names the ones behind ("ranks
that did not arrive at step 7 micro-batch 1: rank 1 (last at step 6 optimizer step)"), and
watches the heartbeats for a few seconds to name the processes that are gone or frozen (killed,
SIGSTOPped) even when every rank had reached the same phase. A rank that fails on its own (an
exception, a full disk) first leaves its error in the store (`report_failure`), so the others'
message says what happened there. If the store itself does not answer (its host, rank 0, is the
one hung or dead), that is named instead. Store load per rank: two writes per optimizer step and
two per HEARTBEAT_S, whatever the accumulation (a write per micro-batch would put thousands of
writes per second on rank 0's store at scale).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import timedelta

import torch

_PREFIX = "roberta_ds/progress/"
_FAILED = "roberta_ds/failed/"
_BEAT = "roberta_ds/heartbeat/"
_HOST = "roberta_ds/host/"
HEARTBEAT_S = 1.0


def collective_failure_in(exc: BaseException) -> BaseException | None:
    """The timed-out or broken collective (peer hung, killed, or crashed) behind `exc`, as gloo/NCCL
    report it, or None. The exception chain is searched: while the error unwinds, the launcher's
    SIGTERM can kill our DataLoader workers, and torch's SIGCHLD handler then raises its own error
    "during handling of" the collective's."""
    dist_error = getattr(torch.distributed, "DistError", ())
    markers = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
               "peer", "nccl", "gloo", "socket")
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).lower()
        if isinstance(e, dist_error) or (isinstance(e, RuntimeError) and any(m in text for m in markers)):
            return e
        e = e.__cause__ or e.__context__
    return None


def is_collective_failure(exc: BaseException) -> bool:
    return collective_failure_in(exc) is not None


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
        self._beat_stop: threading.Event | None = None
        self._mark = ""

    def start_heartbeat(self, interval_s: float = HEARTBEAT_S) -> None:
        """Bump this rank's heartbeat counter every `interval_s` from a daemon thread, until stopped.

        The thread lives as long as the process can run Python: a killed or SIGSTOPped rank stops
        beating, a rank busy in a long kernel or a collective does not.
        """
        if self.store is None or self._beat_stop is not None:
            return
        stop = self._beat_stop = threading.Event()
        store, key = self.store, f"{_BEAT}{self.rank}"

        def beat() -> None:
            n, published = 0, ""
            try:  # where this rank runs: a diagnosis across nodes names the host of a lost rank
                store.set(f"{_HOST}{self.rank}", socket.gethostname())
            except Exception:  # noqa: BLE001 - the store's host is gone (job ending): stop quietly
                return
            while True:  # the first beat at once: a rank that dies a moment later still has one
                try:
                    store.set(key, str(n))
                    mark = self._mark
                    if mark != published:
                        store.set(f"{_PREFIX}{self.rank}", mark)
                        published = mark
                except Exception:  # noqa: BLE001 - the store's host is gone (job ending): stop quietly
                    return
                if stop.wait(interval_s):
                    return
                n += 1

        threading.Thread(target=beat, name="roberta-ds-heartbeat", daemon=True).start()

    def stop_heartbeat(self) -> None:
        """Stop the thread; later marks are published synchronously again (this one too)."""
        if self._beat_stop is not None:
            self._beat_stop.set()
            self._beat_stop = None
            if self._mark:
                try:
                    self.store.set(f"{_PREFIX}{self.rank}", self._mark)
                except Exception:  # noqa: BLE001 - the store's host is gone (job ending)
                    pass

    def _beats(self) -> dict[int, bytes | None]:
        return {r: self.store.get(f"{_BEAT}{r}") if self.store.check([f"{_BEAT}{r}"]) else None
                for r in range(self.world) if r != self.rank}

    def mark(self, step: int, phase: str, publish: bool = True) -> None:
        """Record that this rank reached `phase` of `step`; every rank passes the same marks in order.
        Published now, or with `publish=False` by the heartbeat thread within HEARTBEAT_S (for
        frequent marks such as every micro-batch; published now when no thread runs)."""
        self.seq += 1
        self._mark = f"{self.seq}|{step}|{phase}"
        if self.store is not None and (publish or self._beat_stop is None):
            self.store.set(f"{_PREFIX}{self.rank}", self._mark)

    def report_failure(self, message: str, timeout_s: float = 5.0) -> None:
        """Leave this rank's fatal error in the store for the other ranks' diagnosis (best effort)."""
        if self.store is None:
            return
        try:
            self.store.set_timeout(timedelta(seconds=timeout_s))
            self.store.set(f"{_FAILED}{self.rank}", message[:600])
        except Exception:  # noqa: BLE001 - the store's host may be gone; the error is printed anyway
            return

    def diagnose(self, read_timeout_s: float = 5.0, watch_s: float = 3 * HEARTBEAT_S) -> str:
        """Name the ranks behind the furthest one (all ranks pass the same sequence of marks), the
        ranks whose heartbeat stood still for `watch_s` seconds, and the errors ranks reported."""
        if self.store is None:
            return "no progress store (single process)"
        try:
            self.store.set_timeout(timedelta(seconds=read_timeout_s))
            if self._mark:
                self.store.set(f"{_PREFIX}{self.rank}", self._mark)  # ours is current, not a beat late
            before = self._beats()
            time.sleep(watch_s)
            after = self._beats()
            silent = [r for r in after if after[r] is not None and after[r] == before[r]]
            seen: dict[int, tuple[int, str]] = {}
            failed: dict[int, str] = {}
            hosts: dict[int, str] = {}
            for r in range(self.world):
                if self.store.check([f"{_HOST}{r}"]):
                    hosts[r] = self.store.get(f"{_HOST}{r}").decode(errors="replace")
                key = f"{_PREFIX}{r}"
                if self.store.check([key]):
                    seq, step, phase = self.store.get(key).decode().split("|", 2)
                    seen[r] = (int(seq), f"step {step} {phase}")
                else:
                    seen[r] = (-1, "never reported")
                if r != self.rank and self.store.check([f"{_FAILED}{r}"]):
                    failed[r] = self.store.get(f"{_FAILED}{r}").decode(errors="replace")
        except Exception as e:  # noqa: BLE001
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            return (f"the progress store on rank 0 ({where}) did not answer ({type(e).__name__}): rank 0 or "
                    f"its host hung or died, or {socket.gethostname()} lost its network to it")
        return describe(seen, failed, silent, hosts)


def describe(seen: dict[int, tuple[int, str]], failed: dict[int, str], silent: list[int] = (),
             hosts: dict[int, str] | None = None) -> str:
    """The diagnosis from every rank's last mark {rank: (sequence number, where)}, the errors ranks
    reported, and the ranks whose heartbeat stopped. With `hosts` {rank: hostname} naming more than
    one host, each rank named carries its host ("rank 1 on node07")."""
    hosts = hosts or {}
    on_nodes = len(set(hosts.values())) > 1

    def who(r: int) -> str:
        return f"rank {r} on {hosts[r]}" if on_nodes and r in hosts else f"rank {r}"

    front = max(seq for seq, _ in seen.values())
    behind = {r: v for r, v in seen.items() if v[0] < front}
    ahead = next(where for seq, where in seen.values() if seq == front)
    if not behind:
        text = f"every rank reached {ahead}; the failure happened inside that phase"
    else:
        names = ", ".join(f"{who(r)} (last at {where})" for r, (_, where) in sorted(behind.items()))
        text = f"ranks that did not arrive at {ahead}: {names}"
    if silent:
        names = ", ".join(who(r) for r in sorted(silent))
        text += f"; no heartbeat (process dead or frozen) from {names}"
    if failed:
        text += "; " + "; ".join(f"rank {r} failed: {msg}" for r, msg in sorted(failed.items()))
    return text
