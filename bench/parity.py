"""The parity case of bench/train_throughput.py: our compiled bf16 DeepSpeed step vs eager fp32.

Same batches, dropout 0, a few optimizer steps: our real path (bench/ours_case.py's trainer, DeepSpeed
bf16 ZeRO-2, GuardedAdamW) against an eager fp32 `RobertaMLM` with the same initial weights, torch
AdamW, our LR schedule, weight-decay groups and clipping. It passes when every per-step loss is within
PARITY_RTOL of the reference's, the two parameter updates point the same way (cosine >=
PARITY_MIN_COSINE), and torch.compile did not recompile.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any

from cases import Case
from ours_case import close_trainer, start_trainer

PARITY_RTOL = 0.01
"""Per-step loss tolerance, relative, bf16 vs fp32: bf16 keeps 8 significant bits (unit roundoff
2^-8 = 0.4%); the loss averages thousands of labelled positions, so rounding mostly cancels (the
CPU smoke run shows 0.02%). The reference loss must fall by more than this for the check to bite."""
PARITY_MIN_COSINE = 0.98
"""Cosine between our parameter update and the fp32 reference's: bf16 noise costs ~1e-3; different
batches, weights or a lost update give < 0.5."""


def compare_losses(ours: list[float], ref: list[float], rtol: float = PARITY_RTOL) -> dict[str, Any]:
    """Per-step relative gaps; ok when every one is within rtol (pure, unit-tested)."""
    if len(ours) != len(ref) or not ours:
        raise ValueError(f"need equal non-empty loss lists, got {len(ours)} and {len(ref)}")
    gaps = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, ref)]
    finite = all(math.isfinite(x) for x in ours + ref)
    return {"max_rel_gap": max(gaps), "rtol": rtol, "losses_ok": finite and max(gaps) <= rtol}


def reference_run(rt: Any, steps: int) -> tuple[list[float], dict[str, Any], dict[str, Any]]:
    """Eager fp32 RobertaMLM, same init (seed) and batches, torch AdamW with our schedule, groups and
    clipping, loss / accum per micro-batch (as DeepSpeed scales it). Returns (losses, init, final).
    The reference always attends with the plain key mask over padded rows, whatever attention kernel
    and layout the case's model uses (so `varlen` + `unpad` are checked against it too)."""
    import torch

    from roberta_ds.data.loader import train_loader
    from roberta_ds.engine.optim import lr_at, param_groups
    from roberta_ds.model.model import RobertaMLM

    cfg, plan, dev = rt.cfg, rt.plan, rt.device
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)  # as train.setup does right before building the model
    plain = dataclasses.replace(cfg.model, attention_kernel="sdpa", unpad=False)
    model = RobertaMLM(plain).to(dev).train()
    torch.random.set_rng_state(state)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay),
        lr=lr_at(0, cfg.optim),
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        foreach=False,
    )
    clip = float(rt.ds.get("gradient_clipping", 0.0))
    loader = train_loader(
        rt.data,
        dataclasses.replace(cfg.data, num_workers=0),
        plan=dataclasses.replace(plan, world_size=1, global_batch=plan.micro_batch * plan.grad_accum),
        rank=0,
        start_step=0,
    )
    losses = []
    try:
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg.optim)
            total = 0.0
            for _ in range(plan.grad_accum):
                b = next(loader)
                loss = model(*(b[k].to(dev) for k in ("input_ids", "mlm_positions", "mlm_labels")))
                (loss / plan.grad_accum).backward()
                total += float(loss.detach())
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total / plan.grad_accum)
    finally:
        loader.close()
    return losses, init, {k: v.detach() for k, v in model.named_parameters()}


def update_cosine(init: dict[str, Any], ours: dict[str, Any], ref: dict[str, Any]) -> float:
    """Cosine between (ours - init) and (ref - init) over every parameter."""
    dot = na = nb = 0.0
    for name, p0 in init.items():
        a = ours[name].double().cpu() - p0.double().cpu()
        b = ref[name].double().cpu() - p0.double().cpu()
        dot, na, nb = dot + float((a * b).sum()), na + float((a * a).sum()), nb + float((b * b).sum())
    return dot / math.sqrt(max(na * nb, 1e-300))


def run_parity(c: Case, opts: argparse.Namespace, tok: Path, train: Path) -> dict[str, Any]:
    """The parity row: both loss curves, the largest gap, the update cosine, recompiles and `ok`."""
    from deepspeed.utils import safe_get_full_fp32_param
    from hf_baseline import dynamo_graphs

    extra = [
        "model.dropout=0",
        "model.attention_dropout=0",
        "optim.lr=1e-3",
        "optim.warmup_steps=1",
        "optim.total_steps=1000",
    ]
    rt, trainer = start_trainer(c, tok, train, opts.work / "runs" / c.name, opts.workers, extra)
    try:
        ours = []
        graphs = None
        for step in range(opts.parity_steps):
            trainer.train_step()
            ours.append(float(trainer.loss_sum) / rt.plan.grad_accum)  # a sync per step: a check, not timed
            trainer.loss_sum.zero_()
            if step == 0:
                graphs = dynamo_graphs()
        final = {
            n.removeprefix("_orig_mod."): safe_get_full_fp32_param(p).detach().float()
            for n, p in rt.engine.module.named_parameters()
        }
        recompiles = dynamo_graphs() - graphs
    finally:
        close_trainer(trainer)
    ref, init, ref_final = reference_run(rt, opts.parity_steps)
    row = compare_losses(ours, ref)
    cos = update_cosine(init, final, ref_final)
    row.update(
        {
            "impl": "parity",
            "compile": c.compile,
            "precision": "ds-" + c.precision,
            "zero": c.zero,
            "ours_losses": ours,
            "ref_losses": ref,
            "loss_drop": ref[0] - min(ref),
            "update_cosine": cos,
            "min_cosine": PARITY_MIN_COSINE,
            "recompiles": recompiles,
        }
    )
    row["ok"] = bool(row["losses_ok"] and cos >= PARITY_MIN_COSINE and recompiles == 0)
    return row
