"""The training loop: optimizer steps over the rank's micro-batches, logging, evaluation, checkpoints.

`Trainer.run()` is what `roberta-ds train` does after setup; `Trainer.train_step()` is one
optimizer step (grad_accum micro-batches), also driven directly by bench/train_throughput.py.
Host-device synchronisation: one small all-reduce + read per optimizer step (skip and stop flags);
the loss is read only at log steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from roberta_ds.checkpoint import commit as ckpt
from roberta_ds.comm import all_reduce, comm_device
from roberta_ds.config import config_to_dict
from roberta_ds.engine.comm_report import CommMeter, comms_logging, summary_line
from roberta_ds.engine.metrics import MetricsSink, Window, console_line, flops_per_token, mfu, peak_tflops
from roberta_ds.engine.optim import lr_at
from roberta_ds.engine.runtime import Runtime
from roberta_ds.engine.spike import SpikeGuard, action
from roberta_ds.engine.validation import evaluate, model_inputs, run_baselines
from roberta_ds.launch import dist
from roberta_ds.launch.faults import Faults, spike_factor
from roberta_ds.launch.signals import StopFlag, children_ignore_stop_signals
from roberta_ds.launch.watchdog import Progress

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "saved, run me again" (the slurm/ templates requeue only on this)
EXIT_TOO_MANY_SKIPS = 3


def checkpoint_meta(rt: Runtime, consecutive_skips: int) -> dict[str, Any]:
    """Our side of a checkpoint's manifest (checkpoint.save adds step, tag and the file list)."""
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
        "zero_stage": rt.run.zero_stage,
        "precision": rt.run.precision,
        "samples_consumed": rt.step * rt.plan.global_batch,
        "skipped_steps": rt.skipped_total,
        "tokens_seen": rt.tokens_seen,
        "consecutive_skips": consecutive_skips,
        "data": config_to_dict(cfg.data),
        "data_identity": rt.data_identity,  # data/order.py
        "data_order": rt.order.to_json(),
    }


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    value = float(norm.item() if torch.is_tensor(norm) else norm)
    return value if math.isfinite(value) and value >= 0 else None


def loss_scale(engine: Any) -> float | None:
    if not engine.fp16_enabled():
        return None
    scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None)
    return float(scale) if scale is not None else None


@dataclass
class StepTimes:
    """Seconds per phase, summed over steps, when Trainer(timed=True): data = host time to get a
    micro-batch; forward_backward / optimizer from CUDA events (no extra host sync) or the clock on
    CPU; total = wall time of the steps (device-synchronised by the step's flag read)."""

    data: float = 0.0
    forward_backward: float = 0.0
    optimizer: float = 0.0
    total: float = 0.0


class Trainer:
    def __init__(self, rt: Runtime, stop: StopFlag, faults: Faults, *, timed: bool = False) -> None:
        from roberta_ds.data.loader import mask_slots, valid_batches
        from roberta_ds.data.tokenizer import word_start_table

        self.rt, self.stop, self.faults, self.timed = rt, stop, faults, timed
        cfg, env, plan = rt.cfg, rt.env, rt.plan
        self.sink = MetricsSink(rt.out, enabled=env.rank == 0, tensorboard=cfg.tensorboard)
        self.progress = Progress(env.rank, env.world_size)
        word_starts = word_start_table(cfg.tokenizer) if cfg.data.whole_word_mask else None
        self.word_starts = word_starts
        self.loader = self._open_loader()
        self.valid = []
        if cfg.data.valid and cfg.eval_batches:
            self.valid = list(valid_batches(cfg.data, rank=env.rank, world_size=env.world_size,
                                            micro_batch=plan.micro_batch, max_batches=cfg.eval_batches,
                                            word_starts=word_starts, unpad=cfg.model.unpad))
        self.train_baseline, self.valid_baseline = run_baselines(rt, bool(self.valid))
        # The head runs on K mask slots per row, so the MFU formula's f is K / T.
        self.flops_token = flops_per_token(cfg.model, cfg.data.max_seq_len, mask_slots(cfg.data) / cfg.data.max_seq_len)
        name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else None
        self.peak = cfg.peak_tflops or peak_tflops(name)
        self.comm_dev = comm_device(rt.device)
        self.spike = SpikeGuard(cfg.spike, rt.engine, rt.optimizer, self.comm_dev, rt.spike_state)  # spike.py
        self.rollback_due: tuple[int, list[str]] | None = None
        self.data_batch = rt.order.batch_at(rt.step)  # logged as `data_batch`: the last step's global batch
        if self.spike.norm_note:
            dist.print0(f"[roberta-ds] {self.spike.norm_note}")
        if rt.rng_state is not None:
            # Last before the first step: creating the DataLoader iterator draws from the global RNG.
            ckpt.restore_rng(rt.rng_state)
        self.window = Window()
        self.loss_sum = torch.zeros((), device=rt.device)
        self.pending_tokens = 0  # this rank's real tokens not yet summed into rt.tokens_seen
        self.consecutive_skips = 0
        self.last_saved = rt.step if rt.step > 0 else -1
        self.times = StepTimes()
        self.lr = lr_at(rt.step, cfg.optim) * self.spike.lr_factor
        self.comm = CommMeter(env.world_size) if comms_logging(rt.ds) else None  # comm_report.py
        self.progress.start_heartbeat()  # lets a failing peer tell a dead or frozen rank from a slow one

    def _open_loader(self) -> Any:
        from roberta_ds.data.loader import train_loader

        rt, plan = self.rt, self.rt.plan
        with children_ignore_stop_signals():  # the DataLoader's workers start here
            return iter(train_loader(rt.data, rt.cfg.data, plan=plan, rank=rt.env.rank, start_step=rt.step, word_starts=self.word_starts,
                                     pin_memory=rt.device.type == "cuda", unpad=rt.cfg.model.unpad,
                                     order=rt.order))

    def reopen_loader(self) -> None:
        """Restart the loader at rt.step on rt.order (after a spike rollback)."""
        self.loader.close()
        self.loader = self._open_loader()

    # -- one optimizer step -----------------------------------------------------------------

    def _now(self) -> Any:
        """A phase boundary without a host sync: a recorded CUDA event on GPU, the clock on CPU."""
        if self.rt.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @staticmethod
    def _seconds(a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1e3 if isinstance(a, torch.cuda.Event) else b - a

    def _backward(self, loss: torch.Tensor, step: int, last_micro: bool) -> None:
        engine = self.rt.engine
        value = self.faults.at("grad", step) if self.faults.active and last_micro else None
        if value == "inf":
            param = next(p for p in engine.module.parameters() if p.requires_grad)
            hook = param.register_hook(lambda g: torch.full_like(g, float("inf")))
            engine.backward(loss)
            hook.remove()
        elif spike_factor(value):  # an injected gradient spike: every gradient x factor, the loss as it was
            engine.backward(loss * spike_factor(value))
        else:
            engine.backward(loss)

    def train_step(self) -> tuple[bool, bool]:
        """One optimizer step on every rank; returns (skipped, stopping), agreed by all ranks."""
        rt, plan, engine = self.rt, self.rt.plan, self.rt.engine
        step = rt.step
        t0 = time.perf_counter()
        self.faults.at("step", step)
        self.lr = lr_at(step, rt.cfg.optim) * self.spike.lr_factor  # lr_scale after spike rollbacks
        for group in rt.optimizer.param_groups:
            group["lr"] = self.lr
        tokens = samples = 0
        step_loss = torch.zeros((), device=rt.device)
        marks = []  # (start, after the data, after backward, after engine.step) per micro-batch, if timed
        for micro in range(plan.grad_accum):
            last = micro == plan.grad_accum - 1
            self.progress.mark(step, f"micro-batch {micro}", publish=micro == 0)
            t_data = time.perf_counter()
            batch = next(self.loader)
            if micro == 0:
                self.data_batch = int(batch["sample_index"][0]) // plan.global_batch  # what the loader gave
            if self.faults.active:
                self.faults.at("batch", step, data=batch)
            tokens += int(batch["num_tokens"])
            samples += int(batch["input_ids"].shape[0])
            args, kwargs = model_inputs(batch, rt.device, rt.cfg.model.unpad)
            if self.timed:
                self.times.data += time.perf_counter() - t_data  # host time to get the batch
                marks.append([self._now()])
            loss = engine(*args, **kwargs)
            value = self.faults.at("loss", step) if self.faults.active else None
            if value == "nan":
                loss = loss * float("nan")
            elif spike_factor(value):
                loss = loss * spike_factor(value)
            self._backward(loss, step, last)
            if self.timed:
                marks[-1].append(self._now())
            rt.optimizer.skipped = torch.zeros(())
            step_loss += loss.detach().float()
            if last:
                self.progress.mark(step, "optimizer step")
                self.spike.before_step(step_loss, plan.grad_accum)  # the spike test's loss (spike.py)
            engine.step()  # a no-op until the accumulation boundary
            if self.timed:
                marks[-1].append(self._now())
        self.loss_sum += step_loss
        rt.step += 1
        self.window.add(tokens, samples)
        self.pending_tokens += tokens
        # The one host sync per optimizer step: did any rank skip, did any rank get a stop signal?
        flags = torch.tensor([float(not engine.was_step_applied()), self.stop.value(), self.spike.flag()],
                             device=self.comm_dev)
        flags[0] = torch.maximum(flags[0], rt.optimizer.skipped.to(self.comm_dev))
        all_reduce(flags, torch.distributed.ReduceOp.MAX)
        skipped, stopping = bool(flags[0].item()), bool(flags[1].item())  # synchronises the device
        spiked = bool(flags[2].item())
        spike = self.spike.after_step(applied=not skipped, spiked=spiked)
        if self.timed:
            for start, after_backward, after_step in marks:
                self.times.forward_backward += self._seconds(start, after_backward)
                self.times.optimizer += self._seconds(after_backward, after_step)
            self.times.total += time.perf_counter() - t0
        if spiked and action(rt.cfg.spike, self.spike.rollbacks) == "rollback":
            self.rollback_due = (step, spike)  # _train rolls back after logging this step (rollback.py)
        elif skipped:
            self.count_skip(step, f"loss spike ({'; '.join(spike) or 'on some rank'})" if spiked
                            else "non-finite loss or gradients on some rank")
        else:
            self.consecutive_skips = 0
        return skipped, stopping

    def count_skip(self, step: int, why: str) -> None:
        self.rt.skipped_total += 1
        self.consecutive_skips += 1
        dist.print0(f"[roberta-ds] step {step}: {why}; update skipped on all ranks "
                    f"({self.consecutive_skips} in a row, {self.rt.skipped_total} in total)")

    # -- logging, evaluation, checkpoints ---------------------------------------------------

    def log(self, t_start: float, start_step: int, evaluate_now: bool) -> dict[str, Any]:
        rt, env, plan = self.rt, self.rt.env, self.rt.plan
        f64 = dict(dtype=torch.float64, device=self.comm_dev)
        stats = torch.stack([self.loss_sum.double().to(self.comm_dev), torch.tensor(float(self.window.tokens), **f64),
                             torch.tensor(float(self.window.samples), **f64),
                             torch.tensor(float(self.pending_tokens), **f64)])
        all_reduce(stats)  # loss summed over the window's micro-batches and ranks; tokens; samples; tokens
        self._add_tokens_seen(stats[3].item())
        window_micro = self.window.steps * plan.grad_accum * env.world_size
        seconds = self.window.take()["seconds"]
        tokens_per_s = stats[1].item() / seconds
        record: dict[str, Any] = {
            "step": rt.step, "loss": stats[0].item() / window_micro, "lr": self.lr,
            "grad_norm": grad_norm(rt.engine), "loss_scale": loss_scale(rt.engine),
            "skipped_steps": rt.skipped_total, "tokens_per_s": tokens_per_s,
            "samples_per_s": stats[2].item() / seconds,
            "mfu": mfu(tokens_per_s, self.flops_token, env.world_size, self.peak),
            "peak_mem_gib": peak_memory_gib(rt.device), "samples_consumed": rt.step * plan.global_batch,
            "data_batch": self.data_batch,
            **({"tokens_seen": rt.tokens_seen} if rt.tokens_seen is not None else {}), **self.train_baseline,
        }
        self.loss_sum.zero_()
        if evaluate_now:
            self.progress.mark(rt.step, "evaluation")
            record.update(evaluate(rt, self.valid), **self.valid_baseline)
        elapsed = time.perf_counter() - t_start
        eta = elapsed / max(1, rt.step - start_step) * (rt.cfg.last_step - rt.step)
        self.sink.log(record)
        self.sink.print(console_line(record, rt.cfg.last_step, eta))
        return record

    def _add_tokens_seen(self, tokens: float) -> None:
        """Add every rank's pending tokens (summed already) to the run's count."""
        if self.rt.tokens_seen is not None:
            self.rt.tokens_seen += round(tokens)  # float64 holds integers exactly up to 2**53
        self.pending_tokens = 0

    def save(self, reason: str) -> None:
        rt = self.rt
        self.progress.mark(rt.step, f"save ({reason})")
        pending = torch.tensor([float(self.pending_tokens)], dtype=torch.float64, device=self.comm_dev)
        self._add_tokens_seen(all_reduce(pending).item())  # the checkpoint records the count at its step
        meta = {**checkpoint_meta(rt, self.consecutive_skips), "spike": self.spike.state()}
        path = ckpt.save(rt.engine, rt.out / "checkpoints", rt.step, meta, rt.cfg.keep_last,
                         fault=lambda point: self.faults.at(point, rt.step))
        self.last_saved = rt.step
        dist.print0(f"[roberta-ds] checkpoint {path} committed ({reason})")

    def run(self) -> int:
        """Train to cfg.last_step; returns the process exit code (0, REQUEUE_EXIT_CODE, EXIT_TOO_MANY_SKIPS)."""
        try:
            code = self._train()
            self._write_comms()
        finally:
            self.progress.stop_heartbeat()
            self.sink.close()
        # On an error the process exits at once (train.main kills the workers); here they stop in order
        # (they ignore SIGTERM: signals.py).
        self.loader.close()
        return code

    def _train(self) -> int:
        rt, cfg = self.rt, self.rt.cfg
        t_start, start_step = time.perf_counter(), rt.step
        while rt.step < cfg.last_step:
            if self.comm:
                self.comm.begin()
            _, stopping = self.train_step()
            if self.comm:
                self.comm.end()
            eval_due = bool(self.valid) and (rt.step % cfg.eval_interval == 0 or rt.step == cfg.last_step)
            if rt.step % cfg.log_interval == 0 or rt.step == cfg.last_step or stopping:
                self.log(t_start, start_step, eval_due)
            elif eval_due:
                self.progress.mark(rt.step, "evaluation")
                self.sink.log({"step": rt.step, **evaluate(rt, self.valid), **self.valid_baseline})
            if self.rollback_due:
                from roberta_ds.engine.rollback import roll_back

                (spike_step, reasons), self.rollback_due = self.rollback_due, None
                if not roll_back(self, spike_step, reasons):
                    self.count_skip(spike_step, f"loss spike ({'; '.join(reasons) or 'on some rank'})")
            if self.consecutive_skips >= cfg.max_consecutive_skips:
                self.save("too many skipped steps")
                dist.print0(
                    f"[roberta-ds] aborting: {self.consecutive_skips} consecutive optimizer steps had non-finite "
                    f"loss or gradients (max_consecutive_skips={cfg.max_consecutive_skips}). Checkpoint saved "
                    f"at step {rt.step}; lower optim.lr, check the data, or resume from an earlier checkpoint")
                return EXIT_TOO_MANY_SKIPS
            if stopping:
                cause = self.stop.name()  # before the save: a signal during it changes nothing
                if self.last_saved != rt.step:  # a spike rollback has just committed this step
                    self.save(f"signal {cause}")
                dist.print0(f"[roberta-ds] stopped by {cause} at step {rt.step}; exiting with "
                            f"{REQUEUE_EXIT_CODE} (requeue me)")
                return REQUEUE_EXIT_CODE
            if rt.step % cfg.save_interval == 0 and self.last_saved != rt.step:
                self.save("interval")
        if self.last_saved != rt.step:
            self.save("end of training")
        return 0

    def _write_comms(self) -> None:
        if self.comm and self.rt.env.rank == 0:
            rep = self.comm.write(self.rt.out / "comms.json")
            if rep:
                dist.print0(f"[roberta-ds] {summary_line(rep)}: {self.rt.out / 'comms.json'}")
