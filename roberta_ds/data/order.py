"""Which global batch of the sample order each optimizer step takes, and the resume guard on the data.

    order = DataOrder(start_step=4, skipped=(6, 7))
    order.batch_at(4), order.batch_at(6)        # -> 0, 2  (batch 0 of this order at step 4)

The sample order itself (sampling.py) is a pure function of the data config: global batch `b` is
stream samples [b G, (b + 1) G), G the global batch. A run normally takes batch `step` at optimizer
step `step`. Two things move that mapping, and both are kept in every checkpoint's manifest
(`data_order`), so a resume continues exactly where the run was:

- `start_step`: the step at which the order (re)started. It is 0 unless the data changed at a resume
  that `--allow-data-change` let through: the new order then starts at its batch 0 at the saved step.
- `skipped`: batches of this order that are never consumed, sorted (the loss-spike rollback,
  rollback.py, adds the batches that led to a spike).

`data_identity` lists every setting that moves the sample order or the blocks' contents;
`identity_changes` compares a checkpoint's with the run's. Everything else (num_workers, masking
probabilities, log intervals, world size and micro batch: the order is world-size independent) may
change on resume without a word.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from roberta_ds.config import DataConfig
from roberta_ds.errors import CheckpointError

ALLOW_FLAG = "--allow-data-change"


@dataclass(frozen=True)
class DataOrder:
    """Optimizer step -> global batch of the sample order (see the module docstring)."""

    start_step: int = 0
    skipped: tuple[int, ...] = ()
    """Sorted, unique batch indices of this order that no step takes."""

    def __post_init__(self) -> None:
        if self.start_step < 0 or any(b < 0 for b in self.skipped):
            raise ValueError(f"DataOrder: negative start_step or batch in {self}")
        if list(self.skipped) != sorted(set(self.skipped)):
            raise ValueError(f"DataOrder: skipped must be sorted and unique, got {self.skipped}")

    def batch_at(self, step: int) -> int:
        """The global batch optimizer step `step` takes: the (step - start_step)-th batch not skipped."""
        if step < self.start_step:
            raise ValueError(f"DataOrder: step {step} precedes the order's start at step {self.start_step}")
        batch = step - self.start_step
        for s in self.skipped:  # sorted: each skipped batch at or below the candidate pushes it one further
            if s > batch:
                break
            batch += 1
        return batch

    def skipping(self, batches: Iterable[int]) -> DataOrder:
        """This order with `batches` skipped as well."""
        return DataOrder(self.start_step, tuple(sorted(set(self.skipped) | set(batches))))

    def to_json(self) -> dict[str, Any]:
        return {"start_step": self.start_step, "skipped": list(self.skipped)}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> DataOrder:
        """The order in a checkpoint manifest; one written before the field had the plain order."""
        if not d:
            return cls()
        return cls(int(d["start_step"]), tuple(int(b) for b in d["skipped"]))


def shards_fingerprint(shards: Sequence[Any]) -> str:
    """A shard set's content identity: sha256 over each shard's name, sizes and checksums (the manifest's
    shard list), so a moved directory is the same set and a rebuilt one is not. 16 hex digits."""
    rows = [[s.name, s.bin_bytes, s.idx_bytes, s.bin_sha256, s.idx_sha256] for s in shards]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def data_identity(cfg: DataConfig, manifests: Sequence[Any]) -> dict[str, Any]:
    """Every setting that moves the sample order or the blocks, as `{flag name: value}`.

    `manifests` are the training sets' manifests (shards.Manifest), in `cfg.train`'s order. The
    tokenizer and the global batch move the order too; resume refuses a change of either already
    (resume.check_compatible), whatever --allow-data-change says."""
    return {
        "data.train": [{"path": src.path, "weight": src.weight, "shards": shards_fingerprint(m.shards)}
                       for src, m in zip(cfg.train, manifests)],
        "data.max_seq_len": cfg.max_seq_len,
        "data.packing": cfg.packing,
        "data.seed": cfg.seed,
    }


def legacy_identity(meta: dict[str, Any], run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The identity of a checkpoint written before `data_identity` was stored, from its data config
    (the sets by path and weight: their shards were not fingerprinted then).

    With `run_dir` (the output directory the run has now), a set that sat beside the checkpoint's
    run directory also matches at the same place relative to `run_dir` (`moved_with_run`): a run
    directory copied or moved together with its data keeps the same data."""
    data = meta.get("data") or {}
    saved_run = (meta.get("config") or {}).get("output_dir")
    sets = []
    for src in data.get("train", []):
        moved = _rebased(src["path"], saved_run, run_dir)
        sets.append({"path": src["path"], "weight": src["weight"]}
                    | ({"moved_with_run": moved} if moved != src["path"] else {}))
    out: dict[str, Any] = {"data.train": sets}
    for name in ("max_seq_len", "packing", "seed"):
        if name in data:
            out[f"data.{name}"] = data[name]
    return out


def _rebased(path: str, saved_run: str | None, run_dir: str | os.PathLike | None) -> str:
    """`path` moved the way the run directory moved (saved_run -> run_dir), when both are known and
    `path` shares a parent with saved_run; else `path` as it was."""
    if not saved_run or run_dir is None or not os.path.isabs(path) or not os.path.isabs(saved_run):
        return path
    if os.path.commonpath([path, saved_run]) == os.sep:
        return path  # nothing in common but the root: not "beside" the run
    return os.path.normpath(os.path.join(os.path.abspath(run_dir), os.path.relpath(path, saved_run)))


def _same_sets(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> bool:
    """By content (shard fingerprints) and weight when both sides carry fingerprints, else by path
    (or, for a legacy set, its place relative to a moved run directory) and weight."""
    if len(old) != len(new) or any(float(a["weight"]) != float(b["weight"]) for a, b in zip(old, new)):
        return False
    if all("shards" in s for s in old + new):
        return all(a["shards"] == b["shards"] for a, b in zip(old, new))
    return all(b["path"] in (a["path"], a.get("moved_with_run")) for a, b in zip(old, new))


def _describe_sets(sets: list[dict[str, Any]]) -> str:
    parts = [f"{s['path']} (weight {s['weight']:g}" + (f", shards {s['shards']})" if "shards" in s else ")")
             for s in sets]
    return "[" + ", ".join(parts) + "]"


def identity_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'field: checkpoint OLD, now NEW' for each order-moving setting that differs; [] when none does.

    Sets are compared by content (their shards' fingerprint) and weight when both sides carry the
    fingerprint, else by path and weight (_same_sets)."""
    changes = []
    for name, old in saved.items():
        if name not in now:
            continue
        new = now[name]
        if name == "data.train":
            if not _same_sets(old, new):
                changes.append(f"{name}: checkpoint {_describe_sets(old)}, now {_describe_sets(new)}")
        elif old != new:
            changes.append(f"{name}: checkpoint {old!r}, now {new!r}")
    return changes


def saved_identity(meta: dict[str, Any], run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    return meta["data_identity"] if "data_identity" in meta else legacy_identity(meta, run_dir)


def check_data_unchanged(meta: dict[str, Any], now: dict[str, Any], *, allow: bool, where: Any,
                         run_dir: str | os.PathLike | None = None) -> None:
    """Refuse resuming `meta` (a checkpoint manifest) with a data config that moves the sample order,
    naming each changed setting with both values, unless `allow` (--allow-data-change). `run_dir`: the
    run's output directory now (see legacy_identity)."""
    changes = identity_changes(saved_identity(meta, run_dir), now)
    if changes and not allow:
        raise CheckpointError(
            f"{where}: the data changed since this checkpoint, which moves the sample order its data "
            f"cursor points into (samples would be seen twice or never): {'; '.join(changes)}. Resume "
            f"with the checkpoint's data settings, or pass {ALLOW_FLAG} to continue from step "
            f"{meta['step']} on the new order, which then starts at its first batch"
        )


def resumed_order(meta: dict[str, Any], now: dict[str, Any],
                  run_dir: str | os.PathLike | None = None) -> tuple[DataOrder, str | None]:
    """The order a run resumed from `meta` continues with, and the line to log when the data changed
    (allowed by check_data_unchanged): the new order restarts at the saved step, batches skipped under
    the old one are dropped (their indices meant other samples)."""
    order = DataOrder.from_json(meta.get("data_order"))
    changes = identity_changes(saved_identity(meta, run_dir), now)
    if not changes:
        return order, None
    step = int(meta["step"])
    dropped = (f"; the {len(order.skipped)} batch(es) skipped under the old order no longer apply"
               if order.skipped else "")
    return DataOrder(start_step=step), (
        f"{ALLOW_FLAG}: the data changed ({'; '.join(changes)}); the sample order restarts at step {step}, "
        f"which takes batch 0 of the new order{dropped}")
