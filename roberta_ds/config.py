"""Typed configuration: model shape (with presets), data pipeline, optimizer/schedule, training run.

One owner per setting: the DeepSpeed JSON (ds_configs/) owns batch sizes, precision, ZeRO stage and
gradient clipping; these dataclasses own the model, the data, the optimizer and the schedule.
Every field is validated in `__post_init__` and errors name the field, e.g. `model.num_heads`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from roberta_ds.errors import ConfigError


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and regularisation of a RoBERTa encoder (Liu et al. 2019; fairseq's `roberta_base`)."""

    vocab_size: int = 50265
    """Rows of the word embedding / MLM decoder; >= the tokenizer's vocabulary."""
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_size: int = 3072
    """Inner size of the feed-forward block (4 x hidden in every preset)."""
    max_positions: int = 514
    """Learned position embeddings; RoBERTa offsets positions by pad_id + 1, so 514 serves 512 tokens."""
    type_vocab_size: int = 1
    pad_id: int = 1
    dropout: float = 0.1
    """Dropout on embeddings and on every residual branch."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities (done inside SDPA)."""
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    activation_checkpointing: bool = False
    """Recompute each layer's activations in backward (memory for ~30% more compute)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "type_vocab_size"):
            _require(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
        _require(
            self.hidden_size % self.num_heads == 0,
            "model.num_heads",
            f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}",
        )
        _require(
            self.max_positions > self.pad_id + 1,
            "model.max_positions",
            f"must exceed pad_id + 1 = {self.pad_id + 1} (positions start after the padding index)",
        )
        _require(0 <= self.pad_id < self.vocab_size, "model.pad_id", f"{self.pad_id} is outside the vocabulary")
        for name in ("dropout", "attention_dropout"):
            _require(0.0 <= getattr(self, name) < 1.0, f"model.{name}", "must be in [0, 1)")

    @property
    def max_seq_len(self) -> int:
        """Longest input (incl. <s> and </s>) the position table serves."""
        return self.max_positions - self.pad_id - 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(hidden_size=64, num_layers=2, num_heads=2, ffn_size=256, max_positions=130),
    "roberta-base": ModelConfig(),
    "roberta-large": ModelConfig(hidden_size=1024, num_layers=24, num_heads=16, ffn_size=4096),
}


def model_config(preset: str = "roberta-base", **overrides: Any) -> ModelConfig:
    """A preset with any field overridden: `model_config("tiny", vocab_size=8000)`."""
    if preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"model: unknown field(s) {unknown}; known fields: {sorted(known)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


PACKING_MODES = ("full-sentences", "doc-sentences")


@dataclass(frozen=True)
class DataSource:
    """One shard set (a directory with manifest.json) and its weight in the blend."""

    path: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.weight > 0, f"data source {self.path!r} weight", f"must be > 0, got {self.weight}")


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from and how blocks and masks are made from them."""

    train: tuple[DataSource, ...] = ()
    """Training shard sets, blended by weight."""
    valid: tuple[DataSource, ...] = ()
    """Validation shard sets (perplexity is reported over their union)."""
    max_seq_len: int = 512
    """Tokens per block, including <s> and </s>."""
    packing: str = "full-sentences"
    """`full-sentences` (may cross documents, an extra </s> between them) or `doc-sentences`."""
    mask_prob: float = 0.15
    random_token_prob: float = 0.1
    leave_unmasked_prob: float = 0.1
    whole_word_mask: bool = False
    """Mask whole words (byte-level BPE word starts: tokens that begin with the space marker 'Ġ')."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    seed: int = 1
    """Seeds the sample order and the masks: both are pure functions of (seed, epoch, sample index)."""

    def __post_init__(self) -> None:
        _require(self.max_seq_len >= 8, "data.max_seq_len", f"must be >= 8, got {self.max_seq_len}")
        _require(self.packing in PACKING_MODES, "data.packing", f"must be one of {PACKING_MODES}")
        _require(0 < self.mask_prob < 1, "data.mask_prob", "must be in (0, 1)")
        _require(
            0 <= self.random_token_prob and 0 <= self.leave_unmasked_prob
            and self.random_token_prob + self.leave_unmasked_prob <= 1,
            "data.random_token_prob/leave_unmasked_prob",
            "must be >= 0 and sum to <= 1",
        )
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")


def data_sources(value: Any, name: str) -> tuple[DataSource, ...]:
    """Accept 'dir', ['dir', ...], [{'path': 'dir', 'weight': 2}, ...] or 'dir1:2,dir2:1'."""
    if value is None:
        return ()
    if isinstance(value, str):
        items: list[Any] = [v for v in value.split(",") if v]
    else:
        items = list(value)
    out = []
    for item in items:
        if isinstance(item, DataSource):
            out.append(item)
        elif isinstance(item, dict):
            out.append(DataSource(path=str(item["path"]), weight=float(item.get("weight", 1.0))))
        elif isinstance(item, str):
            path, sep, weight = item.rpartition(":")
            if sep and weight.replace(".", "", 1).isdigit():
                out.append(DataSource(path=path, weight=float(weight)))
            else:
                out.append(DataSource(path=item))
        else:
            raise ConfigError(f"{name}: cannot read a data source from {item!r}")
    return tuple(out)
