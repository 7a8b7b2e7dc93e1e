"""AdamW parameter groups, the learning-rate schedule, and a step that skips non-finite gradients.

Pure functions where possible: `lr_at(step, cfg)` is the whole schedule, so resuming needs no
scheduler state (the step counter in the checkpoint is enough).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from roberta_ds.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to cfg.lr, then linear decay.

    As fairseq's polynomial_decay with power 1: lr = peak * (step + 1) / warmup_steps during warmup
    (the peak at step warmup_steps - 1 and warmup_steps), then linear decay reaching end_lr at
    step total_steps.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.total_steps:
        return cfg.end_lr
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    frac = (cfg.total_steps - step) / span
    return cfg.end_lr + (cfg.lr - cfg.end_lr) * frac


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (ndim >= 2: linear weights, embeddings); never biases or LayerNorm (nanoGPT)."""
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # the tied decoder appears twice
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _any_nonfinite(grads: list[torch.Tensor]) -> torch.Tensor:
    """A float 0/1 flag on the grads' device: 1 when any element is NaN or +-Inf. No host sync."""
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    # Summing per-tensor |g| sums is NaN/Inf exactly when some element is, and needs one kernel per tensor.
    norms = torch._foreach_norm(grads, 1)
    return (~torch.isfinite(torch.stack([n.float() for n in norms]).sum())).float()


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips the whole update when any rank's gradients are non-finite.

    DeepSpeed calls `step()` on every rank with that rank's (reduced, clipped) gradient partition.
    Each rank flags non-finite values, the flags are max-reduced through `all_reduce_max` so every
    rank takes the same decision, and the update is skipped everywhere: parameters and optimizer
    state stay bitwise unchanged (AdamW's step counter included). With the fused kernel the skip
    happens on device via `found_inf` (the mechanism torch's GradScaler uses), with no host sync.
    `skipped` holds the decision of the last step as a device tensor (1.0 = skipped). `veto`, when
    set (spike.SpikeGuard), may call a step bad for other reasons; its answer joins the same flag.
    """

    def __init__(self, params: Iterable, *, all_reduce_max: Callable[[torch.Tensor], None] | None = None,
                 **kwargs) -> None:
        super().__init__(params, **kwargs)
        self._all_reduce_max = all_reduce_max
        self.skipped = torch.zeros(())
        self.veto: Callable[[], bool] | None = None

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - see the class docstring
        if closure is not None:
            raise NotImplementedError("GuardedAdamW does not take a closure")
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        flag = _any_nonfinite(grads)
        if grads:
            flag = flag.to(grads[0].device)
        if self.veto is not None and self.veto():
            flag = torch.ones_like(flag)
        if self._all_reduce_max is not None:
            self._all_reduce_max(flag)
        self.skipped = flag
        if self.defaults.get("fused"):
            self.found_inf = flag  # read by torch's fused AdamW: skips params and state on device
            try:
                return super().step()
            finally:
                del self.found_inf
        if bool(flag.item()):
            return None
        return super().step()
