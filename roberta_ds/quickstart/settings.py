"""The quickstart's training settings, and why they are not the RoBERTa recipe.

The recipe (roberta-base: 512-token sequences, 8K-sequence batches, peak LR 6e-4 after 24K warmup
steps, 500K steps, dropout 0.1) needs GPU-days; trained for minutes on 2 CPU cores it never leaves the
unigram plateau (the loss of a model that ignores context). These settings get a model that uses
context in about 2 minutes of 2-core training, on the built-in corpus and on others of a few MB
(measured curves: README, "Quickstart"):

- a 0.68M-parameter model (hidden 128, 2 layers): about the compute-optimal size for ~1e13 FLOPs;
- 32-token blocks: more rows per token, and 34 position embeddings that learn quickly; the jump from
  the plateau to context use came after ~3M tokens here, against ~5M at 64 and more at 128;
- a 2,048-id vocabulary: every id is seen often enough in a few MB of text to be learnt;
- 128-sequence batches, peak LR 3e-3 after 60 warmup steps, linear decay to 0 at 1,000 steps;
- no dropout (nothing to regularise in 2 minutes), fp32 on CPU (bf16 matmuls are slow on CPUs
  without native bf16), bf16 on GPUs;
- gradient clipping at 1.0, which the recipe does not use (the shipped ds_configs follow the RoBERTa
  paper's 0.0): the curves above were measured with it, at an LR 5x the recipe's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from roberta_ds.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DS_CONFIG = REPO / "ds_configs" / "zero1_bf16.json"
"""ZeRO-1: the lightest stage for a model this small (its optimizer state is a few MB)."""
MAX_EVAL_TOKENS = 200_000
"""Validation at each evaluation covers the whole validation split up to about this many token slots."""


@dataclass(frozen=True)
class QuickstartSettings:
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    seq_len: int = 32
    global_batch: int = 128
    steps: int = 1000
    lr: float = 3e-3
    warmup_steps: int = 60
    valid_fraction: float = 0.05
    """Share of documents held out: large enough that the validation tokens' unigram entropy is stable."""
    evaluations: int = 5
    seed: int = 1
    gradient_clipping: float = 1.0
    """Global gradient-norm clip (DeepSpeed's `gradient_clipping`); the shipped configs have 0.0 (off)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "seq_len", "global_batch", "steps",
                     "evaluations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"quickstart --{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if not 0 < self.valid_fraction < 1:
            raise ConfigError(f"quickstart valid_fraction: must be in (0, 1), got {self.valid_fraction}")
        if self.lr <= 0:
            raise ConfigError(f"quickstart --lr: must be > 0, got {self.lr}")

    def micro_batch(self, ranks: int) -> int:
        """Rows per rank and step (no accumulation); refuses a rank count that does not divide the batch."""
        if ranks < 1 or self.global_batch % ranks:
            raise ConfigError(f"quickstart --ranks {ranks}: must divide the global batch of {self.global_batch} "
                              "sequences (e.g. 1, 2, 4 or 8)")
        return self.global_batch // ranks

    def ds_overrides(self, ranks: int, *, gpus: bool) -> list[str]:
        """`--ds-set` arguments over DS_CONFIG: the batch, the clip, and fp32 on CPU."""
        out = ["--ds-set", f"train_batch_size={self.global_batch}",
               "--ds-set", f"train_micro_batch_size_per_gpu={self.micro_batch(ranks)}",
               "--ds-set", f"gradient_clipping={self.gradient_clipping}"]
        if not gpus:
            out += ["--ds-set", "bf16.enabled=false"]  # fp32 on CPU: bf16 matmuls are slow there
        return out

    def eval_batches(self, valid_blocks: int, ranks: int) -> int:
        """Validation micro-batches per rank: the whole split, capped at MAX_EVAL_TOKENS token slots."""
        per_batch = self.micro_batch(ranks) * ranks
        cap = max(1, MAX_EVAL_TOKENS // (per_batch * self.seq_len))
        return max(1, min(cap, -(-valid_blocks // per_batch)))

    def train_config(self, *, shards: Path, tokenizer: Path, run_dir: Path, valid_blocks: int,
                     ranks: int) -> dict[str, Any]:
        """The `roberta-ds train` config (JSON) of the quickstart run."""
        return {
            "model": {"preset": "tiny", "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                      "num_heads": self.num_heads, "ffn_size": 4 * self.hidden_size,
                      "max_positions": self.seq_len + 2, "dropout": 0.0, "attention_dropout": 0.0},
            "data": {"train": [str(shards / "train")], "valid": [str(shards / "valid")],
                     "max_seq_len": self.seq_len, "num_workers": 0, "seed": self.seed},
            "optim": {"lr": self.lr, "warmup_steps": min(self.warmup_steps, self.steps),
                      "total_steps": self.steps},
            "tokenizer": str(tokenizer),
            "output_dir": str(run_dir),
            "ds_config": str(DS_CONFIG),
            "seed": self.seed,
            "log_interval": max(1, self.steps // 20),
            "eval_interval": max(1, self.steps // self.evaluations),
            "eval_batches": self.eval_batches(valid_blocks, ranks),
            "save_interval": self.steps,
            "keep_last": 1,
        }

    def describe(self, ranks: int, device: str, vocab_size: int) -> str:
        """The settings as printed before training, with the sentence saying why they are not the recipe.
        `vocab_size`: the trained tokenizer's (a small corpus can give fewer ids than asked for)."""
        params = self.parameters(vocab_size)
        return (
            f"model: hidden {self.hidden_size}, {self.num_layers} layers, {self.num_heads} heads, FFN "
            f"{4 * self.hidden_size}, {params / 1e6:.2f}M parameters; data: {self.seq_len}-token blocks, "
            f"vocabulary {vocab_size:,}; {self.steps:,} steps of {self.global_batch} sequences on {ranks} "
            f"{device} rank(s); AdamW peak LR {self.lr:g} after {self.warmup_steps} warmup steps, linear decay; "
            f"no dropout.\n"
            "These differ from the RoBERTa recipe (the default for roberta-base/large: 512-token blocks, "
            "8K-sequence batches, LR 6e-4, 500K steps, dropout 0.1) because that recipe needs GPU-days: a "
            "few minutes of it on CPU cores never leave the unigram plateau, while this small, short-sequence, "
            "high-LR setting learns to use context within them."
        )

    def parameters(self, vocab_size: int) -> int:
        """Parameter count of the model these settings train on `vocab_size` ids (tied decoder counted once)."""
        h, L, V, P = self.hidden_size, self.num_layers, vocab_size, self.seq_len + 2
        embeddings = (V + P + 1) * h + 2 * h
        layer = 3 * h * h + 3 * h + h * h + h + 2 * (4 * h * h) + 4 * h + h + 4 * h
        head = h * h + h + 2 * h + V
        return embeddings + L * layer + head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
