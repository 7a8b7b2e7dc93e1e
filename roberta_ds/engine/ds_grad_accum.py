"""One kernel per parameter for DeepSpeed's fp32 gradient accumulation under bf16 ZeRO-1.

DeepSpeed's `BF16_Optimizer` (bf16 with ZeRO-1 and fp32 gradient accumulation) adds every parameter's bf16 gradient into its fp32 buffer after each
micro-batch as

    hp_grad.data.add_(lp.grad.data.to(hp_grad.dtype).view(hp_grad.shape))

i.e. two kernels per parameter and micro-batch: a cast that writes an fp32 copy of the gradient, then
the add that reads it back. An in-place add with a bf16 operand casts while it reads (PyTorch's type
promotion computes in fp32, the buffer's dtype), so one kernel gives the same bits with 10 bytes
moved per element instead of 18. For roberta-large (392 tensors, 355M parameters) at accumulation 8
that is 3,136 kernels and ~23 GB of memory traffic fewer per optimizer step (what that is worth on
a GPU: bench/NOTES.md).

The replacement is bound to the one optimizer instance, and only when DeepSpeed's method still
holds exactly the line above: another DeepSpeed version keeps its own code (a log line says so).
Tested bitwise against DeepSpeed's own accumulation in tests/test_ds_grad_accum.py.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import torch

EXPECTED_LINE = "hp_grad.data.add_(lp.grad.data.to(hp_grad.dtype).view(hp_grad.shape))"


def _replaceable(optimizer: Any) -> str | None:
    """Why DeepSpeed's accumulation of this BF16_Optimizer is left alone; None when it can be replaced."""
    method = getattr(type(optimizer), "_update_hp_grad", None)
    if method is None:
        return "BF16_Optimizer has no _update_hp_grad"
    try:
        source = inspect.getsource(method)
    except (OSError, TypeError) as e:
        return f"the source of BF16_Optimizer._update_hp_grad is unreadable ({e})"
    if EXPECTED_LINE not in source:
        return "BF16_Optimizer._update_hp_grad is not the version this replacement was written for"
    return None


@torch.no_grad()
def _update_hp_grad(
    self: Any, lp: torch.Tensor, group_idx: int, param_idx: int, clear_lp_grads: bool
) -> None:
    """DeepSpeed 0.19's `BF16_Optimizer._update_hp_grad` with the cast fused into the add."""
    if lp.grad is None:
        return
    if getattr(self, "autoep_folding_tp_group", None) is not None:
        # Expert-parallel folding corrects the gradient first: DeepSpeed's own path does it.
        return type(self)._update_hp_grad(self, lp, group_idx, param_idx, clear_lp_grads)
    hp_grad = self.fp32_groups_gradients[group_idx][param_idx]
    if hp_grad is None:
        raise RuntimeError(f"BF16_Optimizer: no fp32 gradient buffer for group {group_idx} param {param_idx}")
    hp_grad.add_(lp.grad.view(hp_grad.shape))  # fp32 += bf16, cast on read: one kernel
    lp._hp_grad = hp_grad
    self.fp32_groups_has_gradients[group_idx][param_idx] = True
    if clear_lp_grads:
        lp.grad.zero_()


def is_fused(optimizer: Any) -> bool:
    """Whether `fuse_grad_accumulation` bound the one-kernel accumulation to this optimizer."""
    return "_update_hp_grad" in vars(optimizer)


def fuse_grad_accumulation(optimizer: Any) -> str:
    """Bind the one-kernel accumulation to DeepSpeed's bf16 ZeRO-0/1 optimizer. Returns "fused",
    "n/a" (another optimizer: its own path) or "kept: <why>" (DeepSpeed's code differs)."""
    if type(optimizer).__name__ != "BF16_Optimizer":
        return "n/a"
    why = _replaceable(optimizer)
    if why is not None:
        return f"kept: {why}"
    # The grad hooks call self._update_hp_grad: an instance attribute takes precedence.
    optimizer._update_hp_grad = types.MethodType(_update_hp_grad, optimizer)
    return "fused"
