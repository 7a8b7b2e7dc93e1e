"""Settings of the loss-spike policy (`spike.*` in a training config): what counts as a spike, what to do.

    --set spike.policy=rollback --set spike.loss_factor=2 --set spike.lr_scale=0.5

A step is judged against the recent past: its loss (mean over every rank's micro-batches) against
the median loss of the last `window` applied steps, and DeepSpeed's global gradient norm (before
clipping) against their median norm. What happens then is spike.py's and rollback.py's business.
"""

from __future__ import annotations

from dataclasses import dataclass

from roberta_ds.config_types import coerce_fields
from roberta_ds.errors import ConfigError

SPIKE_POLICIES = ("off", "skip", "rollback")


@dataclass(frozen=True)
class SpikeConfig:
    """What a loss spike is and what the run does about one (none of fairseq, Megatron or HF has this)."""

    policy: str = "off"
    """off: train through spikes. skip: discard the step on every rank, like a non-finite one (it counts
    toward max_consecutive_skips). rollback: reload the last committed checkpoint, never consume the
    batches that led to the spike (kept in the checkpoint), scale the LR by lr_scale, continue."""
    loss_factor: float | None = 2.0
    """A step whose loss exceeds loss_factor x the median of the window is a spike (null: no loss test)."""
    grad_norm_factor: float | None = 10.0
    """A step whose gradient norm exceeds grad_norm_factor x the window's median norm is a spike (null:
    no norm test). The norm is DeepSpeed's global one before clipping (ZeRO-1/2/3, bf16, fp16 optimizers)."""
    window: int = 50
    """Applied steps whose loss and norm form the medians (spikes and skipped steps are left out)."""
    min_history: int = 10
    """Steps are judged once the window holds this many steps (not the run's first steps)."""
    skip_batches: int = 1
    """rollback: the global batches of this many steps, ending with the spike's, are never consumed
    again (PaLM skipped a few hundred around each spike); batches the reloaded checkpoint already
    trained on are not among them."""
    lr_scale: float = 1.0
    """rollback: multiply the learning rate by this at every rollback (e.g. 0.5), for the rest of the run."""
    max_rollbacks: int = 5
    """rollback: after this many rollbacks in a run, further spikes are skipped like policy skip."""

    def __post_init__(self) -> None:
        coerce_fields(self, "spike")
        checks = [
            (self.policy in SPIKE_POLICIES, "policy", f"must be one of {', '.join(SPIKE_POLICIES)}, "
                                                      f"got {self.policy!r}"),
            (self.loss_factor is None or self.loss_factor > 1, "loss_factor", "must be > 1 (or null)"),
            (self.grad_norm_factor is None or self.grad_norm_factor > 1, "grad_norm_factor",
             "must be > 1 (or null)"),
            (self.window >= 1, "window", "must be >= 1"),
            (1 <= self.min_history <= self.window, "min_history", f"must be in [1, window={self.window}]"),
            (self.skip_batches >= 1, "skip_batches", "must be >= 1"),
            (0 < self.lr_scale <= 1, "lr_scale", "must be in (0, 1]"),
            (self.max_rollbacks >= 0, "max_rollbacks", "must be >= 0"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise ConfigError(f"spike.{name}: {message}, got {getattr(self, name)!r}"
                                  if "got" not in message else f"spike.{name}: {message}")
        if self.policy != "off" and self.loss_factor is None and self.grad_norm_factor is None:
            raise ConfigError(f"spike.policy: {self.policy} with neither spike.loss_factor nor "
                              "spike.grad_norm_factor set detects nothing; set one of them")
