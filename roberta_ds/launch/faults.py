"""Fault injection at named points of the trainer, for the reliability tests (never set in production).

    ROBERTA_DS_FAULTS="kill_job@save:written:step=4,rank=0; nan@loss:step=3,rank=1"

Each entry is `action@point[:key=value,...]`; `step` and `rank` filter where it fires (absent: any),
`times` caps how often (default 1). Points: `step` (start of an optimizer step), `loss` (each
micro-batch loss), `grad` (the last backward of a step), `save:written` (this rank's files written,
not yet fsynced), `save:before_rename` (manifest written, not committed), `save:before_pointer`
(committed, `latest` not yet updated). Process actions happen at the point: `kill` (SIGKILL this
rank), `kill_job` (SIGKILL the whole process group: the launcher and every rank), `stop` (SIGSTOP
this rank: a hung rank), `sleep=<s>`, `wait=<path>` (block until the file exists: a test holds
the run at a point and lets it go), `raise`, `sigterm` / `sigusr1` (signal this rank),
`sigterm_tree` (SIGTERM to this rank's DataLoader workers, then to it: a scheduler signalling
every process), `unlink=<path>` / `truncate=<path>` (delete a file, or cut it to half its size: a
data shard vanishing or shrinking under the run). Value actions are returned to the caller: `nan`
(poison the loss), `inf` (poison a gradient), `spike[=FACTOR]` (FACTOR x the loss at `loss`, which
scales its gradients too; FACTOR x the gradients alone at `grad`; default SPIKE_FACTOR): a loss
spike for the spike policy (spike.py). With the variable unset, `at()` is one attribute check.

Observation and extra signals, same syntax: `dump=<dir>@batch` saves each micro-batch the model is
given as `<dir>/batch-step<step>-rank<rank>-<n>.npz` (n counts this entry's dumps; `times` to dump
more than one); `sigusr2` signals this rank like `sigusr1`.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

from roberta_ds.errors import ConfigError

ENV = "ROBERTA_DS_FAULTS"
VALUE_ACTIONS = ("nan", "inf", "spike")
SPIKE_FACTOR = 100.0
SPIKE_POINTS = ("loss", "grad")
PROCESS_ACTIONS = ("kill", "kill_job", "stop", "sleep", "wait", "raise", "sigterm", "sigterm_tree", "sigusr1",
                   "unlink", "truncate")
_NEEDS_ARG = {"sleep": "seconds", "wait": "a path", "unlink": "a path", "truncate": "a path"}
PROCESS_ACTIONS += ("sigusr2", "dump")
_NEEDS_ARG["dump"] = "a directory"


class InjectedFault(RuntimeError):
    """Raised by the `raise` action: an unexpected exception on one rank."""


@dataclass
class Fault:
    action: str
    point: str
    arg: str = ""
    step: int | None = None
    rank: int | None = None
    times: int = 1
    fired: int = field(default=0)


def parse(spec: str) -> list[Fault]:
    faults = []
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        action, sep, rest = entry.partition("@")
        if not sep:
            raise ConfigError(f"{ENV}: {entry!r} lacks '@point'")
        point, _, filters = rest.partition(":") if not rest.startswith("save:") else _split_save(rest)
        name, _, arg = action.partition("=")
        if name not in VALUE_ACTIONS + PROCESS_ACTIONS:
            raise ConfigError(f"{ENV}: unknown action {name!r}")
        if name in _NEEDS_ARG and not arg:
            raise ConfigError(f"{ENV}: {entry!r}: {name} needs {_NEEDS_ARG[name]} ({name}=...)")
        if name == "sleep":
            try:
                float(arg)
            except ValueError:
                raise ConfigError(f"{ENV}: {entry!r}: sleep needs seconds, got {arg!r}") from None
        if name == "spike":
            _check_spike(entry, point, arg)
        f = Fault(action=name, point=point, arg=arg)
        for kv in filter(None, filters.split(",")):
            k, _, v = kv.partition("=")
            if k not in ("step", "rank", "times"):
                raise ConfigError(f"{ENV}: unknown filter {k!r} in {entry!r}")
            setattr(f, k, int(v))
        faults.append(f)
    return faults


def _check_spike(entry: str, point: str, arg: str) -> None:
    if point not in SPIKE_POINTS:
        raise ConfigError(f"{ENV}: {entry!r}: spike happens at {' or '.join(SPIKE_POINTS)}, not {point!r}")
    try:
        ok = not arg or float(arg) > 0
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{ENV}: {entry!r}: spike=FACTOR needs a number > 0, got {arg!r}")


def spike_factor(value: str | None) -> float | None:
    """The factor of a `spike` value action returned by `Faults.at` (None for any other value)."""
    if not value or not value.startswith("spike"):
        return None
    _, _, arg = value.partition("=")
    return float(arg) if arg else SPIKE_FACTOR


def _split_save(rest: str) -> tuple[str, str, str]:
    head, _, tail = rest[len("save:"):].partition(":")
    return "save:" + head, ":", tail


class Faults:
    def __init__(self, spec: str | None = None, rank: int = 0) -> None:
        spec = os.environ.get(ENV, "") if spec is None else spec
        self.faults = parse(spec) if spec else []
        self.rank = rank
        self.active = bool(self.faults)

    def at(self, point: str, step: int | None = None, data: dict | None = None) -> str | None:
        """Fire the faults registered for this point/step/rank; returns a value action, if any.
        `data`: the tensors a `dump` at this point saves."""
        if not self.active:
            return None
        value = None
        for f in self.faults:
            if f.point != point or f.fired >= f.times:
                continue
            if (f.step is not None and f.step != step) or (f.rank is not None and f.rank != self.rank):
                continue
            f.fired += 1
            print(f"[fault] rank {self.rank}: {f.action} at {point} step {step}", flush=True)
            if f.action in VALUE_ACTIONS:
                value = f"{f.action}={f.arg}" if f.arg else f.action
            elif f.action == "dump":
                _dump(f, step, self.rank, data or {})
            else:
                _act(f)
        return value


def _act(f: Fault) -> None:
    if f.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif f.action == "kill_job":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    elif f.action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif f.action == "sleep":
        time.sleep(float(f.arg))
    elif f.action == "wait":
        while not os.path.exists(f.arg):
            time.sleep(0.1)
    elif f.action == "raise":
        raise InjectedFault(f"injected exception at {f.point} (step {f.step})")
    elif f.action == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    elif f.action == "sigterm_tree":
        import multiprocessing

        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
    elif f.action == "sigusr1":
        os.kill(os.getpid(), signal.SIGUSR1)
    elif f.action == "sigusr2":
        os.kill(os.getpid(), signal.SIGUSR2)
    elif f.action == "unlink":
        os.unlink(f.arg)
    elif f.action == "truncate":
        os.truncate(f.arg, os.path.getsize(f.arg) // 2)


def _dump(f: Fault, step: int | None, rank: int, data: dict) -> None:
    import numpy as np

    out = os.path.join(f.arg, f"batch-step{step}-rank{rank}-{f.fired - 1}.npz")
    os.makedirs(f.arg, exist_ok=True)
    tmp = f"{out}.tmp.npz"  # np.savez adds .npz to a name without it
    np.savez(tmp, **{k: v.numpy() for k, v in data.items()})
    os.replace(tmp, out)
