"""Building a TrainConfig from a YAML or JSON file and `--set` overrides (the types: config.py).

    cfg = load_train_config("base.yaml", ["optim.lr=1e-4", "model.preset=tiny"])

Overrides are dotted `section.field=value`; values are JSON when they parse, else strings, and every
field is then coerced and checked by its dataclass (config_types.py).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from roberta_ds.config import (
    OPTIM_PRESETS,
    DataConfig,
    OptimConfig,
    TrainConfig,
    data_sources,
    model_config,
)
from roberta_ds.config_types import coerce
from roberta_ds.errors import ConfigError


def parse_value(text: str) -> Any:
    """`--set key=value` values: JSON when it parses (numbers, true/false/null, lists), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def inductor_options(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """compile_options as torch.compile takes them: nested sections (what `--set a.b.c=v` builds) become
    dotted names, {"triton": {"cudagraphs": False}} -> {"triton.cudagraphs": False}."""
    flat: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            flat.update(inductor_options(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `section.field=value` overrides to a nested dict (a copy)."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=1e-4")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = parse_value(value)
    return out


def _build(cls: type, raw: dict[str, Any], section: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{section}: unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**raw)


def train_config_from_dict(raw: dict[str, Any],
                           vocab_size_of: Callable[[str], int] | None = None) -> TrainConfig:
    """Build a validated TrainConfig from the nested dict of a YAML/JSON file (+ overrides).

    Sections: `model` (a `preset` plus any ModelConfig field), `data`, `optim` (defaults from the
    model preset's recipe), and top-level TrainConfig fields. `vocab_size_of(tokenizer_dir)` gives
    the tokenizer's vocabulary size, the model's default `vocab_size` (setup passes the tokenizer
    module's reader: config sits below data/ and does not import it); without it the preset's holds.
    """
    raw = dict(raw)
    section = {name: dict(coerce(raw.pop(name, None) or {}, dict[str, Any], name))
               for name in ("model", "data", "optim")}
    model_raw = section["model"]
    preset = coerce(model_raw.pop("preset", raw.pop("model_preset", "roberta-base")), str, "model.preset")
    if "vocab_size" not in model_raw and raw.get("tokenizer") and vocab_size_of is not None:
        # The embedding matches the tokenizer unless the config says otherwise (HF export needs no padding).
        model_raw["vocab_size"] = vocab_size_of(coerce(raw["tokenizer"], str, "tokenizer"))
    model = model_config(preset, **model_raw)
    data_raw = section["data"]
    for key in ("train", "valid"):
        data_raw[key] = data_sources(data_raw.get(key), f"data.{key}")
    data = _build(DataConfig, data_raw, "data")
    optim_raw = section["optim"]
    base = OPTIM_PRESETS.get(preset, OptimConfig())
    try:
        optim = dataclasses.replace(base, **optim_raw)
    except TypeError as e:
        raise ConfigError(f"optim: {e}") from None
    return _build(TrainConfig, {**raw, "model": model, "model_preset": preset, "data": data, "optim": optim}, "train")


def load_train_config(path: str | None, overrides: list[str] = (),
                      vocab_size_of: Callable[[str], int] | None = None) -> TrainConfig:
    """Read a YAML or JSON training config, apply `--set` overrides, validate (see train_config_from_dict)."""
    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {path}: file not found")
        text = p.read_text()
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml

                raw = yaml.safe_load(text) or {}
            else:
                raw = json.loads(text)
        except Exception as e:  # noqa: BLE001 - both parsers' errors carry line numbers
            raise ConfigError(f"--config {path}: cannot parse ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {path}: the top level must be a mapping")
    return train_config_from_dict(apply_overrides(raw, list(overrides)), vocab_size_of)
