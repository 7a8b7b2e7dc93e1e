"""The loss-spike rollback: back to the last committed checkpoint, never again the batches that led there.

`roll_back(trainer, spike_step, reasons)` runs on every rank after a step that spike.SpikeGuard
called a spike (the step itself was already discarded, as with policy skip):

1. rank 0 picks the newest committed checkpoint of the run; every rank verifies its files (sizes,
   sha256, pickle scan, split across ranks) as a resume would;
2. the global batches of the steps from max(checkpoint step, spike step - skip_batches + 1) to the
   spike step join the run's skipped batches (data_order.DataOrder: a sorted list, deterministic
   for a given run), so they are never consumed again;
3. DeepSpeed reloads the weights and optimizer state; the step, skip counters, token count, spike
   history and this rank's RNG come from the checkpoint's manifest and RNG file; the LR factor is
   multiplied by spike.lr_scale; the loader restarts at the checkpoint's step on the new order;
4. the checkpoint is committed again (same weights, same step) with the new list in its manifest,
   so a resume from it, or from any later checkpoint, skips those batches too.

Without a committed checkpoint of the same world size (none saved yet, or the run resumed across a
world-size change and has not saved since), there is nothing to roll back to: the step counts as a
skipped one instead, and the log says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from roberta_ds.checkpoint import commit as ckpt
from roberta_ds.comm import Comm
from roberta_ds.data.order import DataOrder
from roberta_ds.engine.metrics import Window
from roberta_ds.launch import dist


def batches_to_skip(order: DataOrder, spike_step: int, checkpoint_step: int, count: int) -> list[int]:
    """The global batches of the `count` steps ending at `spike_step`, none before `checkpoint_step`
    (the checkpoint's weights have trained on those already)."""
    return [order.batch_at(s) for s in range(max(checkpoint_step, spike_step - count + 1), spike_step + 1)]


def _target(ckpt_dir: Path, world: int, comm: Comm) -> tuple[Path | None, str]:
    """Rank 0's choice, agreed by all: the newest committed checkpoint, or None and why not."""
    choice: tuple[str | None, str] = (None, "")
    if comm.rank == 0:
        found = ckpt.committed(ckpt_dir)
        if not found:
            choice = (None, f"no committed checkpoint in {ckpt_dir} yet")
        elif int(found[-1].meta["world_size"]) != world:
            choice = (None, f"{found[-1].path} was written by {found[-1].meta['world_size']} ranks, this "
                            f"run has {world} (it loads only through a universal conversion, at a resume)")
        else:
            choice = (str(found[-1].path), "")
    path, why = comm.gather_to_all(choice)[0]
    return (Path(path) if path else None), why


def roll_back(tr: Any, spike_step: int, reasons: list[str]) -> bool:
    """Roll the run of loop.Trainer `tr` back (see the module docstring); False, with nothing changed,
    when there is no checkpoint to go back to."""
    rt, cfg = tr.rt, tr.rt.cfg.spike
    comm = Comm()
    tr.progress.mark(rt.step, "spike rollback")
    path, why = _target(rt.out / "checkpoints", rt.env.world_size, comm)
    if path is None:
        dist.print0(f"[roberta-ds] step {spike_step}: cannot roll back ({why}); the step is skipped instead")
        return False
    meta = ckpt.read_meta(path)
    error = None
    try:
        ckpt.verify_files(path, meta, shard=lambda k: k % comm.world == comm.rank)
    except ckpt.CheckpointError as e:
        error = f"spike rollback: {e}"
    comm.agree_error(error)
    step = int(meta["step"])
    new = batches_to_skip(rt.order, spike_step, step, cfg.skip_batches)
    loaded, _ = rt.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=False, load_module_strict=True)
    if loaded is None:
        raise ckpt.CheckpointError(f"{path}: DeepSpeed could not load it for the spike rollback")
    rt.step, rt.skipped_total = step, int(meta.get("skipped_steps", 0))
    rt.tokens_seen = meta.get("tokens_seen")
    rt.order = rt.order.skipping(new)  # this run's order: the checkpoint may predate a data change
    tr.consecutive_skips = int(meta.get("consecutive_skips", 0))
    tr.spike.rolled_back(meta.get("spike"))
    tr.window, tr.pending_tokens = Window(), 0
    tr.loss_sum.zero_()
    tr.reopen_loader()
    rng = path / ckpt.rng_file(rt.env.rank)
    if rng.is_file():  # after the loader: creating its iterator draws from the global RNG
        ckpt.restore_rng(json.loads(rng.read_text()))
    dist.print0(
        f"[roberta-ds] step {spike_step}: loss spike ({'; '.join(reasons) or 'on some rank'}); rolled back "
        f"to {path.name} (step {step}), rollback {tr.spike.rollbacks} of at most {cfg.max_rollbacks}; global "
        f"batches {new} are never consumed again (skipped in all: {list(rt.order.skipped)}); learning rate x "
        f"{tr.spike.lr_factor:g} from now on")
    tr.sink.log({"step": step, "spike_rollback_from": spike_step + 1, "skip_batches": new,
                 "skipped_batches": list(rt.order.skipped), "lr_factor": tr.spike.lr_factor})
    tr.save("spike rollback: the skipped batches recorded")
    return True
