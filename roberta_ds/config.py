"""Typed configuration: model shape (with presets), data pipeline, optimizer/schedule, training run.

One owner per setting: the DeepSpeed JSON (ds_configs/) owns batch sizes, precision, ZeRO stage and
gradient clipping; these dataclasses own the model, the data, the optimizer and the schedule.
Every field is type-checked and coerced from its annotation first (config_types.py: YAML's `1e-3`
is a string, `--set` values arrive as JSON or strings), then validated in `__post_init__`; errors name
the field, e.g. `model.num_heads`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from roberta_ds.config_types import coerce, coerce_fields
from roberta_ds.errors import ConfigError
from roberta_ds.spike_config import SpikeConfig


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
    attention_kernel: str = "auto"
    """"sdpa" (SDPA with a key-padding mask), "varlen" (FlashAttention-2 over each row's real tokens
    as one segment, no mask; CUDA bf16/fp16, elsewhere the same segments through SDPA), or "auto":
    varlen where that kernel runs (a CUDA device in bf16/fp16), else sdpa (`resolve_auto`). Same maths
    at real positions: see roberta_ds/model/attention.py. Training rows must be right-padded (ours are)."""
    dropout_rng: str = "torch"
    """Where `dropout`'s masks come from in compiled training: "torch" (nn.Dropout; Philox per element
    under torch.compile) or "hash" (a keyed integer hash of the element index, a fraction of Philox's
    arithmetic: roberta_ds/model/hash_dropout.py). Eager runs use nn.Dropout either way."""
    unpad: bool | str = "auto"
    """Run the layers on the real tokens only, packed into one sequence (no compute on padding; needs
    attention_kernel "varlen"). The loader supplies the packed index; same loss and
    gradients. "auto": on exactly where the varlen kernel runs; off elsewhere, where the packed
    sequence's attention would take an N x N block mask (N = every real token of the micro-batch)."""

    def __post_init__(self) -> None:
        coerce_fields(self, "model")
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
        _require(isinstance(self.unpad, bool) or self.unpad == "auto", "model.unpad",
                 f"must be true, false or \"auto\", got {self.unpad!r}: write --set model.unpad=true")
        _require(self.dropout_rng in ("torch", "hash"), "model.dropout_rng",
                 f"must be 'torch' or 'hash', got {self.dropout_rng!r}")
        _require(self.attention_kernel != "triton", "model.attention_kernel",
                 "'triton' was removed: our Triton kernel lost to FlashAttention-2 on an H200 "
                 "(bench/HISTORY.md); choose 'varlen' (or 'auto')")
        _require(
            self.attention_kernel in ATTENTION_KERNELS,
            "model.attention_kernel",
            f"must be one of {', '.join(map(repr, ATTENTION_KERNELS))}, got {self.attention_kernel!r}",
        )
        _require(
            self.unpad is not True or self.attention_kernel == "varlen",
            "model.unpad",
            "needs model.attention_kernel=varlen (padding-free layers attend per row segment)",
        )
        for name in ("dropout", "attention_dropout"):
            _require(0.0 <= getattr(self, name) < 1.0, f"model.{name}", "must be in [0, 1)")

    @property
    def max_seq_len(self) -> int:
        """Longest input (incl. <s> and </s>) the position table serves."""
        return self.max_positions - self.pad_id - 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


ATTENTION_KERNELS = ("auto", "sdpa", "varlen")


def resolve_auto(model: ModelConfig, flash: bool) -> ModelConfig:
    """`model` with "auto" attention_kernel and unpad decided: varlen and padding-free layers when
    `flash` (the model runs on a CUDA device in bf16, fp16 or a 16-bit autocast, where
    FlashAttention-2's varlen kernel runs), else sdpa with the key mask and padded layers. The trainer
    decides once (engine/resolved.py), before it builds the model and the loader, which must agree on
    `unpad`."""
    kernel = model.attention_kernel if model.attention_kernel != "auto" else ("varlen" if flash else "sdpa")
    unpad = model.unpad if model.unpad != "auto" else (kernel == "varlen" and flash)
    return dataclasses.replace(model, attention_kernel=kernel, unpad=unpad)


WEIGHT_FREE_FIELDS = frozenset(
    {"dropout", "attention_dropout", "activation_checkpointing", "attention_kernel", "unpad", "dropout_rng"}
)
"""ModelConfig fields that change how the model runs, not its parameters: they may differ on resume,
and between an export and its checkpoint, without a shape mismatch."""

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
        coerce_fields(self, "data source")
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
        coerce_fields(self, "data")
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
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ConfigError(f"{name}: expected a shard set directory or a list of them, got {value!r} "
                          f"({type(value).__name__})")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, DataSource):
            out.append(item)
        elif isinstance(item, dict):
            unknown = sorted(set(item) - {"path", "weight"})
            if unknown or "path" not in item:
                raise ConfigError(f"{name}[{i}]: expected {{path: DIR, weight: W}}, got {item!r}")
            out.append(DataSource(path=coerce(item["path"], str, f"{name}[{i}].path"),
                                  weight=coerce(item.get("weight", 1.0), float, f"{name}[{i}].weight")))
        elif isinstance(item, str):
            path, sep, weight = item.rpartition(":")
            if sep and weight.replace(".", "", 1).isdigit():
                out.append(DataSource(path=path, weight=float(weight)))
            else:
                out.append(DataSource(path=item))
        else:
            raise ConfigError(f"{name}: cannot read a data source from {item!r}")
    return tuple(out)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and the learning-rate schedule (RoBERTa, Table 9: base 6e-4 / 24K warmup, large 4e-4 / 30K)."""

    lr: float = 6e-4
    """Peak learning rate, reached at the end of warmup."""
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    """Decoupled (AdamW), on tensors with ndim >= 2 only: never on biases or LayerNorm (optim.py)."""
    warmup_steps: int = 24_000
    total_steps: int = 500_000
    """Length of the schedule: linear decay reaches `end_lr` here (also the default number of steps to run)."""
    end_lr: float = 0.0
    fused: bool | None = None
    """torch.optim.AdamW(fused=...): None picks fused where supported (CUDA, and CPU in torch >= 2.4)."""

    def __post_init__(self) -> None:
        coerce_fields(self, "optim")
        _require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", "two values in [0, 1)")
        _require(self.eps > 0, "optim.eps", "must be > 0")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _require(0 <= self.warmup_steps <= self.total_steps, "optim.warmup_steps", "must be in [0, total_steps]")
        _require(self.total_steps >= 1, "optim.total_steps", "must be >= 1")
        _require(0 <= self.end_lr <= self.lr, "optim.end_lr", "must be in [0, lr]")


OPTIM_PRESETS: dict[str, OptimConfig] = {
    "tiny": OptimConfig(lr=1e-3, warmup_steps=20, total_steps=400),
    "roberta-base": OptimConfig(),
    "roberta-large": OptimConfig(lr=4e-4, warmup_steps=30_000),
}


@dataclass(frozen=True)
class TrainConfig:
    """One pretraining run. Batch size, precision, ZeRO stage and clipping live in `ds_config`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    model_preset: str = "roberta-base"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tokenizer: str = ""
    """Tokenizer directory (or tokenizer.json); its sha256 must match every shard set's manifest."""
    output_dir: str = "runs/roberta"
    """Checkpoints, metrics.jsonl, TensorBoard logs and a copy of the tokenizer go here."""
    ds_config: str = "ds_configs/zero2_bf16.json"
    max_steps: int | None = None
    """Stop after this optimizer step (default: optim.total_steps). It only stops a run early: the
    schedule is optim.total_steps long whatever max_steps says, and a max_steps beyond it is refused."""
    seed: int = 1
    """Seeds initialisation and dropout (the data order and masks use data.seed)."""
    log_interval: int = 10
    eval_interval: int = 1000
    eval_batches: int = 50
    """Validation micro-batches per rank at each evaluation."""
    save_interval: int = 1000
    keep_last: int = 3
    """Committed checkpoints to keep (older ones are deleted after a new one is committed)."""
    max_consecutive_skips: int = 10
    """Abort (after saving) when this many optimizer steps in a row had non-finite loss or gradients."""
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    """The loss-spike policy (off, skip, rollback) and its thresholds: roberta_ds/spike_config.py."""
    collective_timeout_s: float = 1800.0
    """A collective that waits longer than this fails the job, naming the ranks that did not arrive."""
    init_from: str | None = None
    """Start from weights made by `roberta-ds import-hf` (continued pretraining)."""
    compile: bool = False
    """torch.compile the model before DeepSpeed wraps it."""
    compile_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Inductor options for that compile (`torch.compile(options=...)`), e.g.
    `--set compile_options.coordinate_descent_tuning=true` or, for a section of torch._inductor.config,
    `--set compile_options.triton.mix_order_reduction_split_size=32` (`inductor_options` flattens it);
    names are checked when the model compiles."""
    peak_tflops: float | None = None
    """Per-device peak for MFU; default from the device name (bf16 dense datasheet figures)."""
    tensorboard: bool = True
    lock_timeout_s: float = 300.0
    """The run holds output_dir through `run.lock` (run_lock.py), its heartbeat refreshed by rank 0 every
    lock_timeout_s / 10 s at most 30 s; a launch that finds a lock whose heartbeat is older than this
    takes it over (its holder is presumed dead). Keep it well above the filesystem's attribute-cache time
    and the nodes' clock skew."""

    def __post_init__(self) -> None:
        coerce_fields(self, "")
        _require(self.model.max_seq_len >= self.data.max_seq_len, "data.max_seq_len",
                 f"{self.data.max_seq_len} exceeds the model's position table "
                 f"(model.max_positions {self.model.max_positions} serves {self.model.max_seq_len} tokens)")
        for name in ("log_interval", "eval_interval", "save_interval", "keep_last", "max_consecutive_skips"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(self.eval_batches >= 0, "eval_batches", "must be >= 0")
        _require(self.collective_timeout_s > 0, "collective_timeout_s", "must be > 0")
        _require(self.lock_timeout_s > 0, "lock_timeout_s", f"must be > 0, got {self.lock_timeout_s}")
        if self.max_steps is not None:
            _require(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
            _require(self.max_steps <= self.optim.total_steps, "max_steps",
                     f"{self.max_steps} exceeds optim.total_steps {self.optim.total_steps}, where the "
                     f"learning-rate schedule ends (from there on lr = optim.end_lr = {self.optim.end_lr:g}); "
                     "max_steps only stops a run early. Lengthen the schedule with optim.total_steps, or "
                     "lower max_steps")
        _require(not self.compile_options or self.compile, "compile_options", "needs compile: true")

    @property
    def last_step(self) -> int:
        return self.max_steps if self.max_steps is not None else self.optim.total_steps


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-able dict of any config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
