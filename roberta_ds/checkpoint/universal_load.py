"""Repair of the optimizer after DeepSpeed loads a ZeRO-3 universal checkpoint (a world-size change).

    hyper = hyperparameters(optimizer)           # before engine.load_checkpoint
    engine.load_checkpoint(..., load_universal)   # DeepSpeed's loader
    repair_zero3_universal_load(engine, hyper, adam_steps=step - skipped_steps)

DeepSpeed's ZeRO-3 universal loader (0.19: `DeepSpeedZeroOptimizer_Stage3.
load_hp_checkpoint_state_from_checkpoint_dir_stage3`) does two things wrong for an optimizer with
more than one parameter group, where its ZeRO-1/2 loader works group by group:
- it stores ONE `step` tensor object (read from group 0) as the step of every sub-group. torch's
  AdamW increments `step` in place once per group per update, so with our two groups the shared
  counter advances twice per optimizer step: after 2 more steps from step 2 it reads 6, not 4, and
  Adam's bias correction is wrong from the first step after the resume;
- it copies group 0's hyperparameters into every group: our no-decay group (biases, LayerNorm,
  optim.param_groups) gets the decay group's weight_decay.
No error, no warning: training goes on, silently different from the run it continues.

The repair takes the values from our own record: each group's hyperparameters as this run built
the optimizer (the config the checkpoint was written with, unless the user changed it), and one
fresh step tensor per sub-group holding the number of updates applied (the checkpoint's step
minus its skipped steps: a skipped step leaves Adam's counter alone, optim.GuardedAdamW).
"""

from __future__ import annotations

from typing import Any

import torch


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's settings (everything but its parameters), in group order."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def repair_zero3_universal_load(engine: Any, hyper: list[dict[str, Any]], adam_steps: int) -> bool:
    """After `engine.load_checkpoint` of a universal checkpoint: per-group hyperparameters and Adam
    step counters as they must be. Returns whether anything was repaired (ZeRO-3 only; ZeRO-1/2
    load per group and are left alone)."""
    ds_opt = engine.optimizer
    if engine.zero_optimization_stage() != 3:
        return False
    groups = ds_opt.optimizer.param_groups
    if len(groups) != len(hyper):
        raise RuntimeError(f"universal load: the optimizer has {len(groups)} parameter groups after loading, "
                           f"{len(hyper)} before")
    for group, settings in zip(groups, hyper):
        group.update(settings)  # "params" is not among them: ZeRO-3 swaps each sub-group's flat partition in
    for flat in ds_opt.fp32_partitioned_groups_flat:
        state = ds_opt.optimizer.state.get(flat)
        if state and "step" in state:
            old = state["step"]
            # A tensor of its own, dtype and device as DeepSpeed left it (torch's AdamW keeps it a tensor).
            state["step"] = torch.full_like(old, adam_steps) if torch.is_tensor(old) else adam_steps
    return True
