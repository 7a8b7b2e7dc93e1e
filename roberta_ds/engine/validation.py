"""Validation and the context-free baselines it is judged against: "is it learning?" at a glance.

`evaluate` is the token-weighted MLM loss, perplexity and top-1 accuracy over every rank's masked
positions; `run_baselines` the unigram entropy and top-1 share of the run's data (data/unigram.py),
which the console line and the summary set the loss and the accuracy against.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from roberta_ds.comm import all_reduce, comm_device
from roberta_ds.engine.runtime import Runtime
from roberta_ds.launch import dist


def model_inputs(
    batch: dict[str, torch.Tensor], device: torch.device, unpad: bool
) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """The engine's arguments for one batch, copied without blocking: (ids, positions, labels), and the
    loader's `unpad_index` when the model runs unpadded (`model.unpad`)."""
    args = tuple(batch[k].to(device, non_blocking=True) for k in ("input_ids", "mlm_positions", "mlm_labels"))
    if not unpad:
        return args, {}
    index = batch["unpad_index"].to(device, non_blocking=True)
    torch._dynamo.maybe_mark_dynamic(index, 0)  # a new length every batch: one graph, not one per length
    return args, {"unpad_index": index}


def evaluate(rt: Runtime, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Validation over every rank's masked positions, token-weighted: {valid_loss, valid_ppl, valid_acc}
    (valid_acc: the share of masked positions whose top-1 prediction is the original token)."""
    rt.engine.eval()
    total = torch.zeros(3, dtype=torch.float64, device=comm_device(rt.device))  # loss x n, n, correct
    with torch.no_grad():
        for b in batches:
            args, kwargs = model_inputs(b, rt.device, rt.cfg.model.unpad)
            loss, correct = rt.engine(*args, **kwargs, count_correct=True)  # loss 0 when nothing is masked
            n = (args[2] != -100).sum()
            total += torch.stack([torch.where(n > 0, loss.double() * n, 0.0), n.double(),
                                  correct.double()]).to(total.device)
    rt.engine.train()
    all_reduce(total)
    count = total[1].clamp(min=1)
    loss = (total[0] / count).item()
    return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50.0)), "valid_acc": (total[2] / count).item()}


def run_baselines(rt: Runtime, valid: bool) -> tuple[dict[str, float], dict[str, float]]:
    """The context-free baselines of the run's data (unigram.py) as metric fields: `unigram_*` of the
    training blend, and `valid_unigram_*` of the validation sets (empty without validation). Every rank
    calls it: sets without stored statistics are counted across ranks."""
    from roberta_ds.data.unigram import describe, group_stats, metric_fields

    def sum_ranks(counts: np.ndarray) -> np.ndarray:
        return all_reduce(torch.from_numpy(counts).to(comm_device(rt.device))).cpu().numpy()

    def log(message: str) -> None:
        dist.print0(f"[roberta-ds] {message}")

    rank, world = rt.env.rank, rt.env.world_size
    blend = rt.data.blend  # mixture weights: samples drawn per block of each set
    train = group_stats([s.path for s in rt.data.sources], [c / n for c, n in zip(blend.counts, blend.sizes)],
                        rank, world, sum_ranks, log)
    dist.print0(f"[roberta-ds] context-free baseline, {describe('training data', train)}")
    if not valid:
        return metric_fields("", train), {}
    stats = group_stats([s.path for s in rt.cfg.data.valid], None, rank, world, sum_ranks, log)
    dist.print0(f"[roberta-ds] context-free baseline, {describe('validation data', stats)}")
    return metric_fields("", train), metric_fields("valid_", stats)
