"""Which fused attention kernel PyTorch's SDPA prefers on CUDA (`TrainConfig.attention`).

SDPA picks the first eligible backend in a fixed priority order: flash, then memory-efficient, then
math, then cuDNN. Our training batches are packed FULL-SENTENCES rows that end in padding, so they
carry a key-padding mask, which flash cannot take: by default they run the memory-efficient kernel.
cuDNN's fused attention takes the mask and dropout, and on Hopper it is the faster kernel for training
shapes (measured by bench/model_check.py and the `*_cudnn` case of bench/train_throughput.py).

  - `torch`: PyTorch's own order, untouched;
  - `cudnn`: cuDNN first, then flash, memory-efficient, math. A shape cuDNN cannot serve falls back
    down the list exactly as before, so the choice changes speed, never what is computed.

The preference is process-wide (SDPA reads global flags) and must be set before the model is first
traced by torch.compile, which fixes the backend into the compiled graph.
"""

from __future__ import annotations

import torch

CHOICES = ("torch", "cudnn")
_TORCH_ORDER = tuple(torch._C._get_sdp_priority_order())
"""PyTorch's own priority, read before anything here changes it."""


def prefer_attention(choice: str) -> str:
    """Set SDPA's backend priority for this process; returns the order now in effect, for the log."""
    from torch.nn.attention import SDPBackend, _sdpa_kernel

    if choice not in CHOICES:
        raise ValueError(f"attention: {choice!r} is not one of {CHOICES}")
    by_value = {int(v): v for v in SDPBackend.__members__.values()}
    order = [by_value[i] for i in _TORCH_ORDER if i in by_value]  # "torch": restores it
    if choice == "cudnn":
        order = [SDPBackend.CUDNN_ATTENTION] + [b for b in order if b != SDPBackend.CUDNN_ATTENTION]
    # The body of `sdpa_kernel(order, set_priority=True)` without its restore-on-exit: training is
    # this process's whole job, so the preference lasts for the process.
    _sdpa_kernel(order, set_priority=True)
    names = {int(v): k.lower() for k, v in SDPBackend.__members__.items()}
    return " > ".join(names.get(int(b), str(b)) for b in torch._C._get_sdp_priority_order())
