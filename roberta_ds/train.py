"""Pretraining under DeepSpeed.

    deepspeed --num_gpus 8 -m roberta_ds.train --config configs/base.yaml
    torchrun --nproc-per-node 8 -m roberta_ds.train --config configs/base.yaml
    srun python -m roberta_ds.train --config ...      (SLURM; see slurm/)
    roberta-ds train --config ...                     (the same, one process or under a launcher)

The loop: each optimizer step consumes global batch `step` of the world-size-independent sample
order (data.py), `grad_accum` micro-batches per rank; the LR is `lr_at(step)`; non-finite values
on any rank skip the step everywhere (optim.GuardedAdamW); SIGTERM/SIGUSR1/SIGUSR2 set a flag that
all ranks agree on at the next step boundary, then they save together and exit with
REQUEUE_EXIT_CODE. Checkpoints commit atomically (checkpoint.py); resume is exact (resume.py).
Only this module and checkpoint/resume import DeepSpeed.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from roberta_ds import checkpoint as ckpt
from roberta_ds import dist
from roberta_ds.config import TrainConfig, config_to_dict, load_train_config
from roberta_ds.ds_config import BatchPlan, batch_plan, load_ds_config, precision, zero_stage
from roberta_ds.errors import ConfigError, UserError
from roberta_ds.faults import Faults
from roberta_ds.metrics import MetricsSink, Window, console_line, flops_per_token, mfu, peak_tflops
from roberta_ds.optim import GuardedAdamW, lr_at, param_groups
from roberta_ds.signals import StopFlag
from roberta_ds.watchdog import Progress, is_collective_failure

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "saved, run me again" (slurm/ templates requeue only on this)
EXIT_TOO_MANY_SKIPS = 3
EXIT_COLLECTIVE_FAILURE = 4


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="roberta-ds train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="training config (YAML or JSON)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=1e-4 --set model.preset=tiny")
    p.add_argument("--ds-config", help="DeepSpeed JSON (default: ds_config from the training config)")
    p.add_argument("--ds-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a DeepSpeed field, e.g. --ds-set train_micro_batch_size_per_gpu=64")
    p.add_argument("--output-dir", help="run directory (default: output_dir from the config)")
    p.add_argument("--resume", default="auto",
                   help="auto (newest committed checkpoint in output_dir, if any), none, or a checkpoint path")
    p.add_argument("--resume-fallback", action="store_true",
                   help="if the chosen checkpoint fails verification, use the newest earlier complete one")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    overrides = list(args.set)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.ds_config:
        overrides.append(f"ds_config={args.ds_config}")
    cfg = load_train_config(args.config, overrides)
    if not cfg.tokenizer:
        raise ConfigError("tokenizer: not set; give the tokenizer directory (--set tokenizer=DIR)")
    if not cfg.data.train:
        raise ConfigError("data.train: no training shard sets; e.g. --set data.train=out/shards/train")
    return cfg


# ----------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    """What setup produced and the loop needs."""

    cfg: TrainConfig
    ds: dict[str, Any]
    plan: BatchPlan
    env: dist.DistEnv
    device: torch.device
    engine: Any
    optimizer: GuardedAdamW
    data: Any
    tokenizer_sha256: str
    step: int
    skipped_total: int
    out: Path


def _comm_device(device: torch.device) -> torch.device:
    return device if device.type == "cuda" else torch.device("cpu")


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t


def _make_all_reduce_max(device: torch.device):
    comm_device = _comm_device(device)

    def reduce_max(flag: torch.Tensor) -> None:
        t = flag.to(comm_device)
        _all_reduce(t, torch.distributed.ReduceOp.MAX)
        flag.copy_(t.to(flag.device))

    return reduce_max


def _copy_tokenizer(src: str, out: Path) -> None:
    """The run keeps the tokenizer it was trained with (export-hf takes it from here)."""
    dst = out / "tokenizer"
    if dst.is_dir():
        return
    src_dir = Path(src) if Path(src).is_dir() else Path(src).parent
    tmp = out / f".tokenizer.tmp.{os.getpid()}"
    shutil.copytree(src_dir, tmp)
    os.replace(tmp, dst)


def _scan_token_range(data: Any, vocab_size: int, rank: int, world: int) -> str | None:
    """Every token id < the model's vocabulary; shards split across ranks. Returns an error or None."""
    from roberta_ds.shards import ShardReader

    shards = [Path(s.path) / info.name for s in data.sources for info in s.manifest.shards]
    for i, prefix in enumerate(shards):
        if i % world != rank:
            continue
        r = ShardReader(prefix)
        if len(r.tokens) and int(r.tokens.max()) >= vocab_size:
            return (f"{prefix}.bin: holds token id {int(r.tokens.max())}, but the model's vocabulary has "
                    f"{vocab_size} ids (model.vocab_size); the shards were made with a larger tokenizer")
    return None


def setup(args: argparse.Namespace, stop: StopFlag) -> Runtime:
    import deepspeed

    from roberta_ds.data import open_train_data
    from roberta_ds.model import RobertaMLM
    from roberta_ds.resume import check_compatible, plan_resume
    from roberta_ds.tokenizer import load_tokenizer_info

    cfg = resolve_config(args)
    env = dist.discover()
    dist.export_env(env)
    ds = load_ds_config(cfg.ds_config, args.ds_set)
    plan = batch_plan(ds, env.world_size, source=f"ds_config {cfg.ds_config}")  # before any process group

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                               timeout=timedelta(seconds=cfg.collective_timeout_s))
    dist.check_world(env, torch.distributed.get_world_size(), dist.expected_world_size(os.environ))
    dist.print0(f"[roberta-ds] {dist.log_source(env)}; global batch {plan.global_batch} = micro "
                f"{plan.micro_batch} x accumulation {plan.grad_accum} x world {plan.world_size}; "
                f"{precision(ds)}, ZeRO-{zero_stage(ds)}")
    comm = ckpt.Comm()

    tok = load_tokenizer_info(cfg.tokenizer)
    data = open_train_data(cfg.data)
    for src in list(data.sources) + list(getattr(data, "valid_sources", [])):
        ckpt_check_tokenizer(src, tok.sha256)
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the shards' vocabulary "
                          f"{data.vocab_size}; set model.vocab_size >= {data.vocab_size}")
    comm.agree_error(_scan_token_range(data, cfg.model.vocab_size, comm.rank, comm.world))

    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    model_dict = config_to_dict(cfg.model)

    def check(c: ckpt.Committed) -> None:
        check_compatible(c.meta, model=model_dict, tokenizer_sha256=tok.sha256,
                         global_batch=plan.global_batch, where=c.path)

    point = plan_resume(ckpt_dir, args.resume, args.resume_fallback, comm, zero_stage=zero_stage(ds),
                        check=check, log=dist.print0)
    if point is not None and point.universal:
        ds = {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = RobertaMLM(cfg.model)
    if cfg.init_from and point is None:
        from roberta_ds.convert_hf import load_pretrained

        init_cfg, state = load_pretrained(cfg.init_from)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"init_from {cfg.init_from}: missing {missing}, unexpected {unexpected}")
    if cfg.compile:
        model = torch.compile(model)  # before deepspeed.initialize (engine.compile crashed with ZeRO-2)
    fused = cfg.optim.fused if cfg.optim.fused is not None else True
    optimizer = GuardedAdamW(param_groups(model, cfg.optim.weight_decay), lr=lr_at(0, cfg.optim),
                             betas=cfg.optim.betas, eps=cfg.optim.eps, fused=fused,
                             all_reduce_max=_make_all_reduce_max(device))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, dist_init_required=False)
    if (engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()) != (plan.micro_batch, plan.grad_accum):
        raise ConfigError(f"DeepSpeed derived micro {engine.train_micro_batch_size_per_gpu()} x accumulation "
                          f"{engine.gradient_accumulation_steps()}, expected {plan.micro_batch} x {plan.grad_accum}")
    # Dropout differs per rank (each rank sees other samples); a resumed run restores the exact states.
    torch.manual_seed(cfg.seed * 100_003 + 1 + env.rank)

    step, skipped_total = 0, 0
    if point is not None:
        loaded, _ = engine.load_checkpoint(str(point.load_dir), tag=point.load_tag, load_optimizer_states=True,
                                           load_lr_scheduler_states=False, load_module_strict=True)
        if loaded is None:
            raise ckpt.CheckpointError(f"{point.chosen.path}: DeepSpeed could not load it")
        step = int(point.chosen.meta["step"])
        skipped_total = int(point.chosen.meta.get("skipped_steps", 0))
        rng = point.chosen.path / ckpt.rng_file(env.rank)
        if not point.universal and rng.is_file():
            import json

            ckpt.restore_rng(json.loads(rng.read_text()))
        dist.print0(f"[roberta-ds] resumed from {point.chosen.path} at step {step}"
                    + (" (universal checkpoint)" if point.universal else ""))
    if env.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _copy_tokenizer(cfg.tokenizer, out)
    return Runtime(cfg, ds, plan, env, device, engine, optimizer, data, tok.sha256, step, skipped_total, out)


def ckpt_check_tokenizer(source: Any, sha256: str) -> None:
    from roberta_ds.shards import check_tokenizer

    check_tokenizer(source.manifest, sha256, f"{source.path}/manifest.json")


# ----------------------------------------------------------------------------------------------


def checkpoint_meta(rt: Runtime, consecutive_skips: int) -> dict[str, Any]:
    cfg = rt.cfg
    return {
        "model": config_to_dict(cfg.model),
        "config": config_to_dict(cfg),
        "ds_config": rt.ds,
        "tokenizer_sha256": rt.tokenizer_sha256,
        "world_size": rt.plan.world_size,
        "global_batch": rt.plan.global_batch,
        "micro_batch": rt.plan.micro_batch,
        "grad_accum": rt.plan.grad_accum,
        "zero_stage": zero_stage(rt.ds),
        "precision": precision(rt.ds),
        "samples_consumed": rt.step * rt.plan.global_batch,
        "skipped_steps": rt.skipped_total,
        "consecutive_skips": consecutive_skips,
        "data": config_to_dict(cfg.data),
    }


def evaluate(rt: Runtime, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float] | None:
    if not batches:
        return None
    rt.engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=_comm_device(rt.device))
    with torch.no_grad():
        for b in batches:
            b = {k: v.to(rt.device, non_blocking=True) for k, v in b.items()}
            loss = rt.engine(b["input_ids"], b["mlm_positions"], b["mlm_labels"])
            n = (b["mlm_labels"] != -100).sum()
            total += torch.stack([loss.double() * n, n.double()]).to(total.device)
    rt.engine.train()
    _all_reduce(total)
    loss = (total[0] / total[1].clamp(min=1)).item()
    return loss, math.exp(min(loss, 50.0))


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def train_loop(rt: Runtime, stop: StopFlag, faults: Faults) -> int:
    from roberta_ds.data import mask_slots, train_loader, valid_batches
    from roberta_ds.tokenizer import word_start_table

    cfg, engine, env, plan = rt.cfg, rt.engine, rt.env, rt.plan
    sink = MetricsSink(rt.out, enabled=env.rank == 0, tensorboard=cfg.tensorboard)
    progress = Progress(env.rank, env.world_size)
    word_starts = word_start_table(cfg.tokenizer) if cfg.data.whole_word_mask else None
    loader = iter(train_loader(rt.data, cfg.data, rank=env.rank, world_size=env.world_size,
                               micro_batch=plan.micro_batch, grad_accum=plan.grad_accum, start_step=rt.step,
                               word_starts=word_starts, pin_memory=rt.device.type == "cuda"))
    valid = (list(valid_batches(cfg.data, rank=env.rank, world_size=env.world_size, micro_batch=plan.micro_batch,
                                max_batches=cfg.eval_batches)) if cfg.data.valid and cfg.eval_batches else [])
    flops_tok = flops_per_token(cfg.model, cfg.data.max_seq_len, mask_slots(cfg.data) / cfg.data.max_seq_len)
    device_name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else None
    peak = cfg.peak_tflops or peak_tflops(device_name)
    comm_dev = _comm_device(rt.device)
    window, t_start, start_step = Window(), time.perf_counter(), rt.step
    loss_sum = torch.zeros((), device=rt.device)
    consecutive = 0
    last_saved = rt.step if rt.step > 0 else -1

    def save(reason: str) -> None:
        nonlocal last_saved
        progress.mark(rt.step, f"save ({reason})")
        path = ckpt.save(engine, rt.out / "checkpoints", rt.step, checkpoint_meta(rt, consecutive), cfg.keep_last,
                         fault=lambda point: faults.at(point, rt.step))
        last_saved = rt.step
        dist.print0(f"[roberta-ds] checkpoint {path} committed ({reason})")

    while rt.step < cfg.last_step:
        step = rt.step
        faults.at("step", step)
        lr = lr_at(step, cfg.optim)
        for group in rt.optimizer.param_groups:
            group["lr"] = lr
        tokens = samples = 0
        for micro in range(plan.grad_accum):
            progress.mark(step, f"micro-batch {micro}")
            batch = next(loader)
            tokens += int(batch["num_tokens"])
            samples += int(batch["input_ids"].shape[0])
            ids = batch["input_ids"].to(rt.device, non_blocking=True)
            pos = batch["mlm_positions"].to(rt.device, non_blocking=True)
            lab = batch["mlm_labels"].to(rt.device, non_blocking=True)
            loss = engine(ids, pos, lab)
            if faults.active:
                if faults.at("loss", step) == "nan":
                    loss = loss * float("nan")
                if micro == plan.grad_accum - 1 and faults.at("grad", step) == "inf":
                    hook = next(p for p in engine.module.parameters() if p.requires_grad).register_hook(
                        lambda g: torch.full_like(g, float("inf")))
                    engine.backward(loss)
                    hook.remove()
                else:
                    engine.backward(loss)
            else:
                engine.backward(loss)
            rt.optimizer.skipped = torch.zeros(())
            if micro == plan.grad_accum - 1:
                progress.mark(step, "optimizer step")
            engine.step()
            loss_sum += loss.detach().float()
        rt.step += 1
        window.add(tokens, samples)
        # One host sync per optimizer step: did any rank skip, and did any rank get a stop signal?
        flags = torch.tensor([float(not engine.was_step_applied()), stop.value()], device=comm_dev)
        flags[0] = torch.maximum(flags[0], rt.optimizer.skipped.to(comm_dev))
        _all_reduce(flags, torch.distributed.ReduceOp.MAX)
        skipped, stopping = bool(flags[0].item()), bool(flags[1].item())
        if skipped:
            rt.skipped_total += 1
            consecutive += 1
            dist.print0(f"[roberta-ds] step {step}: non-finite loss or gradients on some rank; update skipped "
                        f"on all ranks ({consecutive} in a row, {rt.skipped_total} in total)")
        else:
            consecutive = 0

        if rt.step % cfg.log_interval == 0 or rt.step == cfg.last_step or stopping:
            stats = torch.stack([loss_sum.double(), torch.tensor(float(window.tokens), device=rt.device, dtype=torch.float64),
                                 torch.tensor(float(window.samples), device=rt.device, dtype=torch.float64)]).to(comm_dev)
            _all_reduce(stats)  # loss summed over the window's micro-batches and ranks; tokens, samples
            window_micro = window.steps * plan.grad_accum * env.world_size
            seconds = window.take()["seconds"]
            tokens_per_s = stats[1].item() / seconds
            record = {
                "step": rt.step, "loss": stats[0].item() / window_micro,
                "lr": lr, "grad_norm": _grad_norm(engine), "loss_scale": _loss_scale(engine),
                "skipped_steps": rt.skipped_total, "tokens_per_s": tokens_per_s,
                "samples_per_s": stats[2].item() / seconds,
                "mfu": mfu(tokens_per_s, flops_tok, env.world_size, peak),
                "peak_mem_gib": peak_memory_gib(rt.device), "samples_consumed": rt.step * plan.global_batch,
            }
            loss_sum.zero_()
            if valid and (rt.step % cfg.eval_interval == 0 or rt.step == cfg.last_step):
                progress.mark(rt.step, "evaluation")
                record["valid_loss"], record["valid_ppl"] = evaluate(rt, valid)
            elapsed = time.perf_counter() - t_start
            eta = elapsed / max(1, rt.step - start_step) * (cfg.last_step - rt.step)
            sink.log(record)
            sink.print(console_line(record, cfg.last_step, eta))
        elif valid and rt.step % cfg.eval_interval == 0:
            progress.mark(rt.step, "evaluation")
            v = evaluate(rt, valid)
            sink.log({"step": rt.step, "valid_loss": v[0], "valid_ppl": v[1]})

        if consecutive >= cfg.max_consecutive_skips:
            save("too many skipped steps")
            dist.print0(f"[roberta-ds] aborting: {consecutive} consecutive optimizer steps had non-finite loss or "
                        f"gradients (max_consecutive_skips={cfg.max_consecutive_skips}). Checkpoint saved at step "
                        f"{rt.step}; lower optim.lr, check the data, or resume from an earlier checkpoint")
            sink.close()
            return EXIT_TOO_MANY_SKIPS
        if stopping:
            save(f"signal {stop.name()}")
            dist.print0(f"[roberta-ds] stopped by {stop.name()} at step {rt.step}; exit {REQUEUE_EXIT_CODE} (requeue me)")
            sink.close()
            return REQUEUE_EXIT_CODE
        if rt.step % cfg.save_interval == 0:
            save("interval")
    if last_saved != rt.step:
        save("end of training")
    sink.close()
    return 0


def _grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    value = float(norm.item() if torch.is_tensor(norm) else norm)
    return value if math.isfinite(value) and value >= 0 else None


def _loss_scale(engine: Any) -> float | None:
    if not engine.fp16_enabled():
        return None
    scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None)
    return float(scale) if scale is not None else None


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    stop = StopFlag.install()  # first: signals during setup must not kill us mid-write
    rt = None
    try:
        rt = setup(args, stop)
        faults = Faults(rank=rt.env.rank)
        code = train_loop(rt, stop, faults)
    except UserError:
        _teardown()
        raise
    except Exception as e:  # noqa: BLE001 - any failure on one rank must end the whole job promptly
        rank = rt.env.rank if rt else os.environ.get("RANK", "?")
        if rt is not None and is_collective_failure(e):
            who = Progress(rt.env.rank, rt.env.world_size)
            msg = who.diagnose()
            print(f"[roberta-ds] rank {rank}: collective failed ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                  f"{msg}. Timeout is collective_timeout_s={rt.cfg.collective_timeout_s:g}", file=sys.stderr, flush=True)
            os._exit(EXIT_COLLECTIVE_FAILURE)
        print(f"[roberta-ds] rank {rank}: fatal error:", file=sys.stderr, flush=True)
        traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        # Do not wait for other ranks in a collective teardown: the launcher stops them on our exit.
        os._exit(1)
    _teardown()
    return code


def _teardown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    from roberta_ds.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
