"""Communication per optimizer step, from DeepSpeed's comms logger: what each rank sends, by kind.

Turn it on with the DeepSpeed config (`--ds-set comms_logger.enabled=true --ds-set
comms_logger.prof_all=true`); the trainer then writes `comms.json` in the output directory at the end:
every collective of the optimizer steps (logging, evaluation and checkpoints excluded; the first step
of the process too, since it carries setup traffic), its message sizes and calls per step, and the
bytes each rank sends per step on a ring, split into gradient reduction and parameter gathering:
the quantities `roberta-ds plan` models (plan_model.comm_bytes_per_step), so a run checks the plan.
Only collectives made through deepspeed.comm are logged (all of DeepSpeed's; not the trainer's own 8-byte
flag all-reduce per step). Diagnostic only: DeepSpeed synchronises the device around every logged
collective.

Bytes a rank sends on a ring of N ranks, for a message of S bytes as the logger records it (the
`tensor` argument: the whole buffer for all_reduce and reduce_scatter_tensor, one rank's shard for
all_gather_into_tensor):
    all_reduce 2 S (N-1)/N,  reduce_scatter_tensor S (N-1)/N,  all_gather_into_tensor S (N-1).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

Counts = dict[str, dict[int, int]]
"""op -> message bytes -> calls."""

CONTROL_BYTES = 1024
"""Messages up to this size are flags and scalars (skip/stop flags, overflow, norms), not tensors."""

_RING = {
    "all_reduce": lambda s, n: 2 * s * (n - 1) / n,
    "reduce_scatter_tensor": lambda s, n: s * (n - 1) / n,
    "all_gather_into_tensor": lambda s, n: s * (n - 1),
}
_KIND = {"all_reduce": "gradient", "reduce_scatter_tensor": "gradient", "all_gather_into_tensor": "parameter"}


def counts_of(comms_dict: Mapping[str, Mapping[int, Any]]) -> Counts:
    """The calls per op and message size in DeepSpeed's `comms_logger.comms_dict` (a copy)."""
    return {op: {int(size): int(rec[0]) for size, rec in sizes.items()} for op, sizes in comms_dict.items()}


def subtract(after: Counts, before: Counts) -> Counts:
    """Calls made between two snapshots."""
    out: Counts = {}
    for op, sizes in after.items():
        for size, n in sizes.items():
            d = n - before.get(op, {}).get(size, 0)
            if d:
                out.setdefault(op, {})[size] = d
    return out


def add(a: Counts, b: Counts) -> Counts:
    out = {op: dict(sizes) for op, sizes in a.items()}
    for op, sizes in b.items():
        for size, n in sizes.items():
            out.setdefault(op, {})[size] = out.get(op, {}).get(size, 0) + n
    return out


def ring_bytes(counts: Counts, world_size: int) -> dict[str, float]:
    """Bytes one rank sends for these calls: {"gradient", "parameter", "control", "other"}."""
    out = {"gradient": 0.0, "parameter": 0.0, "control": 0.0, "other": 0.0}
    for op, sizes in counts.items():
        for size, n in sizes.items():
            sent = _RING[op](size, world_size) if op in _RING else float(size)
            kind = "control" if size <= CONTROL_BYTES else _KIND.get(op, "other")
            out[kind] += n * sent
    return out


def report(counts: Counts, steps: int, world_size: int) -> dict[str, Any]:
    """comms.json's content: calls per step by op and message size, and ring bytes per step by kind."""
    if steps < 1:
        raise ValueError("report: steps must be >= 1")
    per_step = {op: {str(size): n / steps for size, n in sorted(sizes.items())}
                for op, sizes in sorted(counts.items())}
    sent = {k: v / steps for k, v in ring_bytes(counts, world_size).items()}
    return {"steps": steps, "world_size": world_size, "calls_per_step": per_step, "bytes_sent_per_step": sent}


def summary_line(rep: dict[str, Any]) -> str:
    sent = rep["bytes_sent_per_step"]
    return (f"communication per optimizer step and rank ({rep['steps']} steps, {rep['world_size']} ranks): "
            f"gradients {sent['gradient'] / 1e6:.2f} MB, parameters {sent['parameter'] / 1e6:.2f} MB sent")


class CommMeter:
    """Sums the collectives of each optimizer step after the first, from DeepSpeed's comms logger."""

    def __init__(self, world_size: int) -> None:
        from deepspeed.comm import comms_logger

        self._logger, self.world_size = comms_logger, world_size
        self.steps, self.total, self._before, self._warm = 0, {}, {}, False

    def begin(self) -> None:
        self._before = counts_of(self._logger.comms_dict)

    def end(self) -> None:
        if self._warm:  # the process's first step also carries setup traffic: not counted
            self.total = add(self.total, subtract(counts_of(self._logger.comms_dict), self._before))
            self.steps += 1
        self._warm = True

    def write(self, path: Path) -> dict[str, Any] | None:
        """Writes comms.json (atomically); None when fewer than two steps ran."""
        if self.steps == 0:
            return None
        from roberta_ds.durable import atomic_write_bytes

        rep = report(self.total, self.steps, self.world_size)
        atomic_write_bytes(path, (json.dumps(rep, indent=1) + "\n").encode())
        return rep


def comms_logging(ds: Mapping[str, Any]) -> bool:
    """Whether the DeepSpeed config logs every collective (comms_logger enabled with prof_all)."""
    cl = ds.get("comms_logger", {})
    return bool(cl.get("enabled")) and bool(cl.get("prof_all", True))
