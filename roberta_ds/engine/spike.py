"""Loss-spike detection inside the optimizer step, through the same all-rank veto as a non-finite step.

    guard = SpikeGuard(cfg.spike, rt.engine, rt.optimizer, comm_device)   # installs the veto
    guard.before_step(step_loss_sum, micro_batches)   # before the step's last engine.step()
    engine.step()                                     # GuardedAdamW asks guard's veto; a spike skips
    reasons = guard.after_step(applied, spiked)       # the verdict; applied steps join the history

Per step: the step's loss is the mean over every rank's micro-batches (one small all-reduce, only
with a policy other than off) and the gradient norm is DeepSpeed's global norm before clipping,
which ZeRO-1/2/3 and DeepSpeed's bf16/fp16 optimizers compute before they call ours
(`engine.optimizer._global_grad_norm`). Both are the same on every rank; the veto is max-reduced
with the non-finite flag anyway (optim.GuardedAdamW), so every rank skips or none does. A skipped
step leaves parameters and optimizer state bitwise unchanged. Spikes, skipped and non-finite steps
never enter the medians. The history, the rollback count and the LR factor go into every
checkpoint (`state()`), so a resumed run judges and scales as the uninterrupted one would.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

import torch

from roberta_ds.spike_config import SpikeConfig


def judge(loss: float, norm: float | None, losses: list[float], norms: list[float],
          cfg: SpikeConfig) -> list[str]:
    """Why this step is a spike ([] when it is not): its loss or gradient norm against the medians of
    the recent applied steps. Non-finite values are left to the non-finite path."""
    reasons = []
    if cfg.loss_factor is not None and len(losses) >= cfg.min_history and math.isfinite(loss):
        median = statistics.median(losses)
        if loss > cfg.loss_factor * median:
            reasons.append(f"loss {loss:.4g} > {cfg.loss_factor:g} x median {median:.4g}")
    norm_judged = norm is not None and math.isfinite(norm) and len(norms) >= cfg.min_history
    if cfg.grad_norm_factor is not None and norm_judged:
        median = statistics.median(norms)
        if norm > cfg.grad_norm_factor * median:
            reasons.append(f"grad norm {norm:.4g} > {cfg.grad_norm_factor:g} x median {median:.4g}")
    return reasons


def action(cfg: SpikeConfig, rollbacks: int) -> str:
    """What a spike leads to: "rollback" while the policy allows one more, else "skip"."""
    return "rollback" if cfg.policy == "rollback" and rollbacks < cfg.max_rollbacks else "skip"


def _norm_of(engine: Any, optimizer: Any) -> float | None:
    """DeepSpeed's global gradient norm of the step being taken (None where it computes none: no ZeRO
    and fp32, where the engine hands its gradients to our optimizer directly)."""
    wrapper = engine.optimizer
    if wrapper is optimizer:
        return None
    norm = getattr(wrapper, "_global_grad_norm", None)
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


class SpikeGuard:
    """The spike test of one run (see the module docstring); inert with policy off."""

    def __init__(self, cfg: SpikeConfig, engine: Any, optimizer: Any, comm_device: torch.device,
                 state: dict[str, Any] | None = None) -> None:
        self.cfg, self.engine, self.optimizer, self.comm_device = cfg, engine, optimizer, comm_device
        self.active = cfg.policy != "off"
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.norms: deque[float] = deque(maxlen=cfg.window)
        self.rollbacks = 0
        self.lr_factor = 1.0
        self._loss: float | None = None
        self._norm: float | None = None
        self._verdict: list[str] | None = None
        self.norm_note: str | None = None
        if state:
            self.restore(state, history_only=False)
        if self.active:
            optimizer.veto = self._veto
            if _norm_of(engine, optimizer) is None and cfg.grad_norm_factor is not None:
                self.norm_note = ("spike.grad_norm_factor: DeepSpeed computes no gradient norm in this "
                                  "configuration (no ZeRO, fp32); only the loss is judged")

    # -- checkpoint state -------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (`spike` in its manifest)."""
        return {"losses": list(self.losses), "grad_norms": list(self.norms), "rollbacks": self.rollbacks,
                "lr_factor": self.lr_factor}

    def restore(self, state: dict[str, Any], *, history_only: bool) -> None:
        """The history from a checkpoint; with `history_only` (a rollback) the rollback count and LR
        factor stay this run's: they count what happened since that checkpoint was written."""
        self.losses.clear()
        self.norms.clear()
        self.losses.extend(float(x) for x in state.get("losses", []))
        self.norms.extend(float(x) for x in state.get("grad_norms", []))
        if not history_only:
            self.rollbacks = int(state.get("rollbacks", 0))
            self.lr_factor = float(state.get("lr_factor", 1.0))

    def rolled_back(self, state: dict[str, Any] | None) -> None:
        """Count a rollback to a checkpoint with spike state `state`, and scale the LR."""
        self.restore(state or {}, history_only=True)
        self.rollbacks += 1
        self.lr_factor *= self.cfg.lr_scale

    # -- one step ---------------------------------------------------------------------------

    def before_step(self, loss_sum: torch.Tensor, micro_batches: int) -> None:
        """The step's mean loss over every rank (`loss_sum`: this rank's summed micro-batch losses).
        Every rank calls it, before the engine.step() that ends the step."""
        self._verdict, self._norm = None, None
        if not self.active:
            return
        t = torch.stack([loss_sum.detach().double().to(self.comm_device),
                         torch.tensor(float(micro_batches), dtype=torch.float64, device=self.comm_device)])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
        self._loss = (t[0] / t[1]).item()

    def _veto(self) -> bool:
        """GuardedAdamW's question, asked once per parameter group (ZeRO steps groups one at a time):
        judged at the first ask, the same answer after."""
        if self._verdict is None:
            self._norm = _norm_of(self.engine, self.optimizer)
            self._verdict = judge(self._loss if self._loss is not None else math.nan, self._norm,
                                  list(self.losses), list(self.norms), self.cfg)
        return bool(self._verdict)

    def flag(self) -> float:
        """1.0 when this rank judged the step a spike (the loop max-reduces it with its other flags)."""
        return 1.0 if self._verdict else 0.0

    def after_step(self, applied: bool, spiked: bool) -> list[str]:
        """The step's reasons (when some rank called it a spike); an applied, unspiked step with a finite
        loss joins the history."""
        reasons = self._verdict or []
        if self.active and applied and not spiked and self._loss is not None and math.isfinite(self._loss):
            self.losses.append(self._loss)
            if self._norm is not None and math.isfinite(self._norm):
                self.norms.append(self._norm)
        self._verdict, self._loss, self._norm = None, None, None
        return reasons
