"""`init_from` (continued pretraining): check the pretrained weights against the run, then load them.

    roberta-ds import-hf --hf-dir roberta-base/ --out init/
    deepspeed ... -m roberta_ds.train --config base.yaml --set init_from=init/ --set tokenizer=tok/

Before any step, on every rank alike (each reads the same files), the weights must fit the run's model:
- every tensor of the model present with the model's shape, and no other tensor (named, both shapes);
- the weights' vocabulary is the run's: the same number of ids and, where the source recorded it
  (`import-hf` keeps the sha256 of the Hugging Face directory's tokenizer.json), the same tokenizer.
  A vocabulary of the same size from another tokenizer fits every shape and silently scrambles the
  meaning of every embedding row, so it is refused too, naming the way to adopt the right tokenizer;
- the config fields that change what the weights compute without changing a shape (`num_heads`,
  `pad_id`, `layer_norm_eps`, ...) equal the weights' own config.
Then the state dict loads strictly. Run-time fields (dropout, attention kernel, activation
checkpointing: config.WEIGHT_FREE_FIELDS) and `init_std` (unused when the weights are given) may differ.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from roberta_ds.config import WEIGHT_FREE_FIELDS, ModelConfig
from roberta_ds.errors import ConfigError

SOURCE_FILE = "source.json"
"""Written by `import-hf` beside the weights: {"hf_dir": ..., "tokenizer_sha256": ... or null}."""
WORD_EMBEDDING = "embeddings.word.weight"
SHOWN = 6
"""Mis-shaped tensors named in full (a hidden-size mismatch touches every one)."""
IGNORED_FIELDS = WEIGHT_FREE_FIELDS | {"init_std"}
"""ModelConfig fields that may differ between the weights and the run (they hold no trained meaning)."""


def source_tokenizer_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of the tokenizer.json the weights at `path` were trained with, where known: recorded by
    `import-hf` in source.json, or the tokenizer.json of a Hugging Face directory given directly."""
    d = Path(path)
    record = d / SOURCE_FILE
    if record.is_file():
        return json.loads(record.read_text()).get("tokenizer_sha256")
    if (d / "config.json").is_file() and (d / "tokenizer.json").is_file():
        from roberta_ds.durable import file_sha256

        return file_sha256(d / "tokenizer.json")
    return None


def _vocab_fix(weights_vocab: int, run_vocab: int) -> str:
    return (f"the weights have a vocabulary of {weights_vocab} ids, the run's model "
            f"{run_vocab} (model.vocab_size, the run tokenizer's size unless set). Train with the tokenizer "
            "the weights were trained with: adopt its tokenizer.json "
            "(`roberta-ds tokenizer --out tok/ --from <hf-dir>/tokenizer.json`), build the shards with it "
            "(`roberta-ds build-shards ... --tokenizer tok/`) and set tokenizer=tok/")


def _named(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def init_problems(init_cfg: ModelConfig, weights: dict[str, torch.Tensor], model_cfg: ModelConfig,
                  model_shapes: dict[str, tuple[int, ...]],
                  weights_tokenizer: str | None = None, run_tokenizer: str | None = None) -> list[str]:
    """Why `weights` (with their config `init_cfg`) cannot initialise the model `model_cfg`, whose
    state dict has `model_shapes`; empty when they fit. Tokenizers are compared by sha256 when both
    are known."""
    problems = []
    shapes = {name: tuple(t.shape) for name, t in weights.items()}
    word = shapes.get(WORD_EMBEDDING)
    if word and WORD_EMBEDDING in model_shapes and word[0] != model_shapes[WORD_EMBEDDING][0]:
        problems.append(_vocab_fix(word[0], model_shapes[WORD_EMBEDDING][0]))
    elif weights_tokenizer and run_tokenizer and weights_tokenizer != run_tokenizer:
        problems.append(
            f"the weights were trained with the tokenizer of sha256 {weights_tokenizer[:16]}..., "
            f"the run uses {run_tokenizer[:16]}... (a vocabulary of the same size from another tokenizer: "
            "every embedding row would stand for another token). Adopt the weights' tokenizer.json "
            "(`roberta-ds tokenizer --out tok/ --from <hf-dir>/tokenizer.json`), build the shards with it "
            "and set tokenizer=tok/")
    mis_shaped = [f"{name}: weights {shapes[name]} vs model {want}"
                  for name, want in model_shapes.items() if name in shapes and shapes[name] != want]
    if mis_shaped:
        more = f"; and {len(mis_shaped) - SHOWN} more" if len(mis_shaped) > SHOWN else ""
        problems.append(f"tensor shapes differ: {'; '.join(mis_shaped[:SHOWN])}{more}")
    missing = sorted(set(model_shapes) - set(shapes))
    unexpected = sorted(set(shapes) - set(model_shapes))
    if missing:
        problems.append(f"tensors the model has and the weights lack: {_named(missing)}")
    if unexpected:
        problems.append(f"tensors in the weights the model does not have: {_named(unexpected)}")
    differ = [f"model.{f.name}: weights {getattr(init_cfg, f.name)!r} vs run {getattr(model_cfg, f.name)!r}"
              for f in dataclasses.fields(ModelConfig)
              if f.name not in IGNORED_FIELDS and getattr(init_cfg, f.name) != getattr(model_cfg, f.name)]
    if differ:
        fix = " ".join(f"--set model.{f.name}={json.dumps(getattr(init_cfg, f.name))}"
                       for f in dataclasses.fields(ModelConfig)
                       if f.name not in IGNORED_FIELDS | {"vocab_size"}
                       and getattr(init_cfg, f.name) != getattr(model_cfg, f.name))
        problems.append(f"the model config differs from the weights' ({'; '.join(differ)})"
                        + (f"; match it: {fix}" if fix else ""))
    return problems


def load_init(model: torch.nn.Module, model_cfg: ModelConfig, path: str, run_tokenizer: str) -> str:
    """Check the weights at `path` (import-hf output or a Hugging Face directory) against `model`
    (built from `model_cfg`) and the run's tokenizer sha256, then load them strictly. Raises ConfigError
    naming every problem; returns a log line."""
    from roberta_ds.hf.convert import load_pretrained

    init_cfg, weights = load_pretrained(path)
    model_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    weights_tokenizer = source_tokenizer_sha256(path)
    problems = init_problems(init_cfg, weights, model_cfg, model_shapes, weights_tokenizer, run_tokenizer)
    if problems:
        raise ConfigError(f"init_from {path}: refused, the weights do not fit this run: "
                          + "; ".join(problems))
    model.load_state_dict(weights, strict=True)
    checked = ("tokenizer sha256 matches" if weights_tokenizer
               else "the source recorded no tokenizer to compare")
    return (f"initialised from {path}: {len(weights)} tensors, shapes and config match ({checked})")
