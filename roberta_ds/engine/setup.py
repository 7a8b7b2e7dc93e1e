"""Pretraining under DeepSpeed: setup (config -> engine -> data -> Trainer). Run it as

    deepspeed --num_gpus 8 -m roberta_ds.train --config configs/base.yaml
    torchrun --nproc-per-node 8 -m roberta_ds.train --config configs/base.yaml
    srun python -m roberta_ds.train --config ...      (SLURM; see slurm/)
    roberta-ds train --config ...                     (the same, one process or under a launcher)

The loop: each optimizer step consumes global batch `step` of the world-size-independent sample
order (data/loader.py), `grad_accum` micro-batches per rank; the LR is `lr_at(step)`; non-finite values
on any rank skip the step everywhere (engine/optim.GuardedAdamW); SIGTERM/SIGUSR1/SIGUSR2 set a flag that
all ranks agree on at the next step boundary, then they save together and exit with
REQUEUE_EXIT_CODE. Checkpoints commit atomically (checkpoint/commit.py); resume is exact (checkpoint/resume.py).
Only engine/ and checkpoint/ import DeepSpeed (tests/test_structure.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from roberta_ds.checkpoint import commit as ckpt
from roberta_ds.checkpoint.resume import ResumePoint, check_compatible, plan_resume
from roberta_ds.checkpoint.universal_load import hyperparameters, repair_zero3_universal_load
from roberta_ds.comm import Comm, make_all_reduce_max
from roberta_ds.config import config_to_dict
from roberta_ds.config_load import inductor_options
from roberta_ds.data.order import DataOrder, check_data_unchanged, data_identity, resumed_order
from roberta_ds.data.shard_set import Manifest, check_tokenizer, read_manifest
from roberta_ds.data.shards import ShardReader
from roberta_ds.engine.ds_grad_accum import fuse_grad_accumulation
from roberta_ds.engine.optim import GuardedAdamW, lr_at, param_groups
from roberta_ds.engine.resolved import ResolvedRun, resolve_config, resolve_run  # noqa: F401 - resolve_config re-exported
from roberta_ds.engine.runtime import Runtime, release_shm_buffers, set_default_collective_timeout
from roberta_ds.engine.trainer import EXIT_TOO_MANY_SKIPS, REQUEUE_EXIT_CODE, Trainer  # noqa: F401 - exit codes re-exported
from roberta_ds.errors import ConfigError, UserError
from roberta_ds.launch import dist
from roberta_ds.launch.faults import Faults
from roberta_ds.launch.net import check_rendezvous_network
from roberta_ds.launch.run_lock import RunLock, RunLockError, release_held
from roberta_ds.launch.signals import StopFlag
from roberta_ds.launch.watchdog import Progress, collective_failure_in

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
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume although the data settings that fix the sample order changed (train sets, "
                        "weights, max_seq_len, packing, seed); the new order starts at the saved step")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


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
    shards = [Path(src.path) / info.name for src in data.sources for info in src.manifest.shards]
    for i, prefix in enumerate(shards):
        if i % world != rank:
            continue
        top = max((int(part.max()) for _, part in ShardReader(prefix).iter_token_chunks()), default=-1)
        if top >= vocab_size:
            return (f"{prefix}.bin: holds token id {top}, but the model's vocabulary has "
                    f"{vocab_size} ids (model.vocab_size); the shards were made with a larger tokenizer")
    return None


def setup(args: argparse.Namespace, stop: StopFlag) -> Runtime:
    """config -> resolved run -> process group -> data -> output directory and resume point -> engine
    -> restored state. Each step is one function below, in this order."""
    run = resolve_run(args)
    comm = _start_distributed(run)
    data = _open_data(run, comm)
    # Before anything reads or writes the output directory: one run per directory.
    comm.agree_error(_hold_output_dir(run.out, run.cfg.lock_timeout_s, comm.rank))
    identity = data_identity(run.cfg.data, [s.manifest for s in data.sources])
    point = _resume_point(run, identity, args, comm)
    engine, optimizer, ds = _build_engine(run, point)
    _seed_this_rank(run)
    state = _restore(run, engine, optimizer, point, identity) if point is not None else ResumeState()
    if run.env.rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        _copy_tokenizer(run.cfg.tokenizer, run.out)
    return Runtime(run=run, ds=ds, engine=engine, optimizer=optimizer, data=data, data_identity=identity,
                   step=state.step,
                   skipped_total=state.skipped_total, rng_state=state.rng_state, tokens_seen=state.tokens_seen,
                   order=state.order, spike_state=state.spike_state)


def _start_distributed(run: ResolvedRun) -> Comm:
    """The process group (every collective, DeepSpeed's own groups too, times out after
    collective_timeout_s) and the banner that says what was decided."""
    import deepspeed

    if run.cuda:
        torch.cuda.set_device(run.device)
    net = check_rendezvous_network(run.env, run.backend)
    timeout = timedelta(seconds=run.cfg.collective_timeout_s)
    set_default_collective_timeout(timeout)
    deepspeed.init_distributed(dist_backend=run.backend, auto_mpi_discovery=False, timeout=timeout)
    dist.check_world(run.env, torch.distributed.get_world_size(), run.expected_world)
    release_shm_buffers(torch.distributed.get_rank())
    plan, model = run.plan, run.cfg.model
    dist.print0(f"[roberta-ds] {dist.log_source(run.env)}; global batch {plan.global_batch} = micro "
                f"{plan.micro_batch} x accumulation {plan.grad_accum} x world {plan.world_size}; "
                f"{run.precision}, ZeRO-{run.zero_stage}; attention {model.attention_kernel}"
                f"{', padding-free layers' if model.unpad else ''}{'; ' + net if net else ''}")
    return Comm()


def _open_data(run: ResolvedRun, comm: Comm) -> Any:
    """The training sets, opened and packed; every shard set (training and validation) checked here,
    once, against the run's tokenizer, and every token id against the model's vocabulary."""
    from roberta_ds.data.loader import open_train_data

    cfg = run.cfg
    data = open_train_data(cfg.data)
    check_data_tokenizer(run, {s.path: s.manifest for s in data.sources}
                         | {s.path: read_manifest(s.path) for s in cfg.data.valid})
    comm.agree_error(_scan_token_range(data, cfg.model.vocab_size, comm.rank, comm.world))
    return data


def check_data_tokenizer(run: ResolvedRun, manifests: dict[str, Manifest]) -> None:
    """The one check of the data against the run: every shard set (training and validation, path ->
    manifest) was made with the run's tokenizer, and the model's vocabulary holds the sets' ids."""
    for path, m in manifests.items():
        check_tokenizer(m, run.tokenizer.sha256, f"{path}/manifest.json")
        if m.vocab_size > run.cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size {run.cfg.model.vocab_size} is smaller than the vocabulary of "
                              f"{path} ({m.vocab_size}); set model.vocab_size >= {m.vocab_size}")


def _resume_point(run: ResolvedRun, identity: dict[str, Any], args: argparse.Namespace,
                  comm: Comm) -> ResumePoint | None:
    """The checkpoint to resume from (--resume, --resume-fallback), checked against this run's model,
    tokenizer, global batch and data; None for a fresh start."""
    model_dict = config_to_dict(run.cfg.model)

    def check(c: ckpt.Committed) -> None:
        check_compatible(c.meta, model=model_dict, tokenizer_sha256=run.tokenizer.sha256,
                         global_batch=run.plan.global_batch, where=c.path)
        check_data_unchanged(c.meta, identity, allow=args.allow_data_change, where=c.path, run_dir=run.out)

    return plan_resume(run.out / "checkpoints", args.resume, args.resume_fallback, comm, zero_stage=run.zero_stage,
                       check=check, log=dist.print0)


def _build_engine(run: ResolvedRun, point: ResumePoint | None) -> tuple[Any, GuardedAdamW, dict[str, Any]]:
    """The model (seeded alike on every rank; init_from's weights on a fresh start), GuardedAdamW and the
    DeepSpeed engine; returns the DeepSpeed config as given to initialize."""
    import deepspeed

    from roberta_ds.model.model import RobertaMLM

    cfg = run.cfg
    ds = {**run.ds, "zero_allow_untested_optimizer": True}  # DeepSpeed's ZeRO whitelist checks exact classes
    if point is not None and point.universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = RobertaMLM(cfg.model)
    if cfg.init_from and point is None:  # a resumed run takes its weights from the checkpoint
        from roberta_ds.hf.init_check import load_init

        dist.print0(f"[roberta-ds] {load_init(model, cfg.model, cfg.init_from, run.tokenizer.sha256)}")
    if cfg.compile:
        try:  # before deepspeed.initialize (engine.compile crashed with ZeRO-2)
            model = torch.compile(model, options=inductor_options(cfg.compile_options) or None)
        except RuntimeError as e:  # torch names the unknown option, then lists all 300 known ones
            raise ConfigError(f"compile_options: {str(e).split(', known options')[0]}; the names are "
                              "torch._inductor.config's") from None
    optimizer = GuardedAdamW(param_groups(model, cfg.optim.weight_decay), lr=lr_at(0, cfg.optim),
                             betas=cfg.optim.betas, eps=cfg.optim.eps,
                             fused=cfg.optim.fused if cfg.optim.fused is not None else True,
                             all_reduce_max=make_all_reduce_max(run.device))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, dist_init_required=False)
    accum = fuse_grad_accumulation(engine.optimizer)
    if accum.startswith("kept"):
        dist.print0(f"[roberta-ds] fp32 gradient accumulation: DeepSpeed's own cast+add ({accum})")
    got = (engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps())
    if got != (run.plan.micro_batch, run.plan.grad_accum):
        raise ConfigError(f"DeepSpeed derived micro {got[0]} x accumulation {got[1]}, expected "
                          f"{run.plan.micro_batch} x {run.plan.grad_accum}")
    return engine, optimizer, ds


def _seed_this_rank(run: ResolvedRun) -> None:
    """Dropout differs per rank (each rank sees other samples); a resumed run restores the exact states.
    Nothing of ours draws from numpy's or Python's global RNG, but a library might: seed them too, so two
    runs of one config match and a checkpoint's RNG state is a function of the run, not of the process."""
    seed = run.cfg.seed * 100_003 + 1 + run.env.rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@dataclass(frozen=True, kw_only=True)
class ResumeState:
    """Where a run continues: all zero for a fresh start."""

    step: int = 0
    skipped_total: int = 0
    rng_state: dict[str, Any] | None = None
    tokens_seen: int | None = 0
    order: DataOrder = DataOrder()
    spike_state: dict[str, Any] | None = None


def _restore(run: ResolvedRun, engine: Any, optimizer: GuardedAdamW, point: ResumePoint,
             identity: dict[str, Any]) -> ResumeState:
    """Load `point` into the engine (repairing DeepSpeed's ZeRO-3 universal load) and read the counters,
    this rank's RNG states (same world size only) and the data order it continues with."""
    hyper = hyperparameters(optimizer)  # this run's per-group settings, before DeepSpeed loads anything
    loaded, _ = engine.load_checkpoint(str(point.load_dir), tag=point.load_tag, load_optimizer_states=True,
                                       load_lr_scheduler_states=False, load_module_strict=True)
    if loaded is None:
        raise ckpt.CheckpointError(f"{point.chosen.path}: DeepSpeed could not load it")
    meta = point.chosen.meta
    step, skipped_total = int(meta["step"]), int(meta.get("skipped_steps", 0))
    if point.universal:  # DeepSpeed's ZeRO-3 universal load mixes up groups' steps and settings
        repair_zero3_universal_load(engine, hyper, adam_steps=step - skipped_total)
    rng = point.chosen.path / ckpt.rng_file(run.env.rank)
    rng_state = json.loads(rng.read_text()) if not point.universal and rng.is_file() else None
    dist.print0(f"[roberta-ds] resumed from {point.chosen.path} at step {step}"
                + (" (universal checkpoint)" if point.universal else ""))
    order, data_note = resumed_order(meta, identity, run.out)
    if data_note:
        dist.print0(f"[roberta-ds] {data_note}")
    return ResumeState(step=step, skipped_total=skipped_total, rng_state=rng_state,
                       tokens_seen=meta.get("tokens_seen"), order=order, spike_state=meta.get("spike"))


def _hold_output_dir(out: Path, timeout_s: float, rank: int) -> str | None:
    """Rank 0 takes `out`'s run lock (run_lock.py) for the life of this process and keeps its heartbeat;
    returns why it could not, for every rank to stop with. A run that loses the lock to a takeover
    ends at once (exit 1), before it writes another byte into `out`."""
    if rank != 0:
        return None
    try:
        lock = RunLock.acquire(out, timeout_s, log=dist.print0)
    except RunLockError as e:
        return str(e)
    lock.start_heartbeat(on_lost=lambda message: _fatal(0, f"error: {message}", 1), log=dist.print0)
    return None


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> NoReturn:
    """Train, then exit the process with 0, REQUEUE_EXIT_CODE or EXIT_TOO_MANY_SKIPS (`_exit_after_run`).
    Failures end this process at once.

    Exit paths when something fails (every rank prints one line saying what happened to it):
    - a collective timed out or broke (a peer hung, died or failed): EXIT_COLLECTIVE_FAILURE (4),
      naming the ranks that did not arrive and what failed ranks reported (watchdog.py);
    - an error on this rank during training (a shard deleted under it, a full disk while saving, a
      bug): 1, after leaving the message in the store for the others. No teardown: the others may
      sit in a collective that will never complete; the launcher or their own collective error
      (peer gone) ends them, within collective_timeout_s at worst;
    - a UserError during setup (bad config or files: every rank raises it alike): 1 via the CLI.
    Rank 0 releases the output directory's run lock on each of these paths and on every exit after
    training (0, 75, 3); only a killed process leaves it, to be taken over (run_lock.py).
    """
    args = parse_args(sys.argv[1:] if argv is None else argv)
    stop = StopFlag.install()  # first: signals during setup must not kill us mid-write
    rt = None
    try:
        rt = setup(args, stop)
        code = Trainer(rt, stop, Faults(rank=rt.env.rank)).run()
    except UserError as e:
        if rt is None:
            _teardown()
            raise
        _ignore_workers()
        _fatal(rt.env.rank, f"error: {e}", 1)
    except Exception as e:  # noqa: BLE001 - any failure on one rank must end the whole job promptly
        _ignore_workers()
        rank = rt.env.rank if rt else os.environ.get("RANK", "?")
        cause = collective_failure_in(e)
        if cause is not None and torch.distributed.is_initialized():
            who = Progress(torch.distributed.get_rank(), torch.distributed.get_world_size())
            timeout = rt.cfg.collective_timeout_s if rt else "?"
            what = f"{type(cause).__name__}: {str(cause).splitlines()[0][:300]}"
            _fatal(rank, f"collective failed ({what}); {who.diagnose()}. "
                         f"Timeout is collective_timeout_s={timeout}", EXIT_COLLECTIVE_FAILURE)
        _fatal(rank, f"fatal error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", 1,
               with_traceback=True)
    _teardown()
    _exit_after_run(code)


def _ignore_workers() -> None:
    """From here on a dying DataLoader worker (the launcher SIGTERMs our process tree) must not raise
    torch's "DataLoader worker is killed" error into the middle of our exit path."""
    import signal

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def _fatal(rank: int | str, message: str, code: int, with_traceback: bool = False) -> NoReturn:
    """Print, leave the message for the other ranks, stop our DataLoader workers, exit now (no teardown)."""
    print(f"[roberta-ds] rank {rank}: {message}", file=sys.stderr, flush=True)
    if with_traceback:
        traceback.print_exc()
    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    if dist_on and code != EXIT_COLLECTIVE_FAILURE:
        Progress(torch.distributed.get_rank(), torch.distributed.get_world_size()).report_failure(message)
    import multiprocessing

    for child in multiprocessing.active_children():  # DataLoader workers would outlive us by seconds
        child.kill()
    release_held()  # the run is over: the next launch may have the output directory at once
    sys.stderr.flush()
    sys.stdout.flush()
    # Do not wait for other ranks in a collective teardown: the launcher stops them on our exit.
    os._exit(code)


def _teardown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _exit_after_run(code: int) -> NoReturn:
    """Leave a finished run: Python's exit handlers (ours stop loader workers; logging flushes) and
    MPI_Finalize when MPI started us, then exit without finalizing the interpreter. Its C++ static
    destructors are where a 2-rank CPU run once aborted with "terminate called without an active
    exception" after it had trained, committed its checkpoint and written everything (the launcher
    then exits 250: a finished job reported as failed); nothing of ours is left to run there."""
    import atexit

    from roberta_ds.launch.mpi import finalize as finalize_mpi

    atexit._run_exitfuncs()
    finalize_mpi()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
