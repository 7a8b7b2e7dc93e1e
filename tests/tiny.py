"""The tiny model unit tests build: one builder, seeded, any ModelConfig field overridden."""

from __future__ import annotations

from typing import Any

import torch

from roberta_ds.config import model_config
from roberta_ds.model.model import RobertaMLM


def tiny_model(vocab_size: int, *, seed: int = 0, **overrides: Any) -> RobertaMLM:
    """RobertaMLM of the "tiny" preset (2 layers, hidden 64) with `vocab_size` ids, its init drawn after
    torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return RobertaMLM(model_config("tiny", vocab_size=vocab_size, **overrides))
