"""Typed configs (roberta_ds/config_types.py): every field of every config dataclass refuses a value of
the wrong type, naming the field, the value, its type and what was expected; numbers and booleans
accept what YAML 1.1, JSON and `--set` give; `max_steps` never runs past `optim.total_steps`.

The field test enumerates `dataclasses.fields` of every dataclass in roberta_ds.config, so a new
field is checked the day it is added (and a field typed `Any`, which nothing can check, fails here).
"""

from __future__ import annotations

import dataclasses
import subprocess
import types
import typing
from pathlib import Path
from typing import Any

import pytest

from roberta_ds import config as config_module
from roberta_ds.config_load import load_train_config, train_config_from_dict
from roberta_ds.config_types import describe, field_types
from roberta_ds.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
CONFIG_CLASSES = sorted(
    (obj for obj in vars(config_module).values()
     if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__.startswith("roberta_ds.")),
    key=lambda cls: cls.__name__,
)
"""Every config dataclass defined in, or imported into, roberta_ds.config (a section may live in a module
of its own, like spike_config.SpikeConfig)."""
SECTION = {"ModelConfig": "model", "DataConfig": "data", "OptimConfig": "optim", "TrainConfig": "",
           "DataSource": "data source", "SpikeConfig": "spike"}
TINY_YAML = "model: {preset: tiny}\ndata: {max_seq_len: 128}\n"
TINY_SET = ["model.preset=tiny", "data.max_seq_len=128"]
REQUIRED = {"DataSource": {"path": "data/train"}}
"""Fields without a default, given a valid value when another field is tested."""


def _members(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def wrong_value(annotation: Any) -> Any:
    """A value no member of `annotation` accepts (decided from the annotation alone, not by the code
    under test): text for numbers, a number for strings, 1.5 where a union holds a string."""
    members = _members(annotation)
    if any(m is Any for m in members):
        raise AssertionError(f"{annotation!r}: a field typed Any cannot be checked; give it a real type")
    if all(m in (int, float, bool) for m in members):
        return "abc" if bool not in members else "maybe"
    if float in members or int in members:
        raise AssertionError(f"{annotation!r}: no wrong value chosen for this union; extend wrong_value")
    return 1.5  # not a str, bool, list, mapping or dataclass


def _cases() -> list[tuple[type, str, Any]]:
    return [(cls, name, annotation) for cls in CONFIG_CLASSES
            for name, annotation in field_types(cls).items()]


def test_the_config_classes_are_all_found() -> None:
    assert [c.__name__ for c in CONFIG_CLASSES] == sorted(SECTION)


@pytest.mark.parametrize("cls, name, annotation", _cases(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_every_field_refuses_a_wrong_type_naming_it(cls: type, name: str, annotation: Any) -> None:
    wrong = wrong_value(annotation)
    field = f"{SECTION[cls.__name__]}.{name}" if SECTION[cls.__name__] else name
    with pytest.raises(ConfigError) as e:
        cls(**{**REQUIRED.get(cls.__name__, {}), name: wrong})
    assert str(e.value) == f"{field}: expected {describe(annotation)}, got {wrong!r} ({type(wrong).__name__})"


def _numeric_fields() -> list[tuple[type, str, Any]]:
    return [(cls, name, ann) for cls, name, ann in _cases()
            if set(_members(ann)) & {int, float}
            and getattr(cls(**REQUIRED.get(cls.__name__, {})), name) is not None]


@pytest.mark.parametrize("cls, name, annotation", _numeric_fields(),
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_every_numeric_field_takes_its_value_as_text(cls: type, name: str, annotation: Any) -> None:
    """What YAML 1.1 leaves a string (`1e-3`, `5e5`), JSON's floats and plain text all give the number."""
    base = REQUIRED.get(cls.__name__, {})
    default = getattr(cls(**base), name)
    forms = [str(default), f"{float(default):e}", f" {default!r} "]
    if int in _members(annotation):
        forms.append(float(default))
    for form in forms:
        got = getattr(cls(**{**base, name: form}), name)
        assert got == default and type(got) is type(default), (form, got)


def test_yaml_and_command_line_forms_of_a_learning_rate(tmp_path: Path) -> None:
    for text in ("1e-3", "1.0e-3", '"1e-3"', "0.001", "1E-3"):
        path = tmp_path / "c.yaml"
        path.write_text(f"{TINY_YAML}optim:\n  lr: {text}\n")
        assert load_train_config(str(path)).optim.lr == 0.001, text
    assert load_train_config(None, ["optim.lr=1e-3", *TINY_SET]).optim.lr == 0.001
    with pytest.raises(ConfigError, match=r"^optim\.lr: expected a number, got 'abc' \(str\)$"):
        load_train_config(None, ["optim.lr=abc"])
    # PyYAML turned `lr: 1e-3` into a string the comparisons choked on; `5e5` steps is a string too.
    path = tmp_path / "steps.yaml"
    path.write_text(f"{TINY_YAML}optim: {{total_steps: 5e5, warmup_steps: 1.0e+3}}\nmax_steps: 2.5e5\n")
    cfg = load_train_config(str(path))
    assert (cfg.optim.total_steps, cfg.optim.warmup_steps, cfg.max_steps) == (500_000, 1000, 250_000)
    with pytest.raises(ConfigError, match=r"^optim\.total_steps: expected an integer, got 2\.5 \(float\)$"):
        load_train_config(None, ["optim.total_steps=2.5"])


@pytest.mark.parametrize("text, value", [
    ("true", True), ("yes", True), ("on", True), ("Y", True), ('"True"', True), ("1", True),
    ("false", False), ("no", False), ("off", False), ('"n"', False), ("0", False),
])
def test_booleans_take_yamls_forms(tmp_path: Path, text: str, value: bool) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{activation_checkpointing: {text}}}\ntensorboard: {text}\n")
    cfg = load_train_config(str(path))
    assert (cfg.model.activation_checkpointing, cfg.tensorboard) == (value, value)
    assert load_train_config(None, [f"tensorboard={text.strip(chr(34))}"]).tensorboard is value


def test_lists_and_mappings_are_checked() -> None:
    assert train_config_from_dict({"optim": {"betas": ["0.9", 0.98]}}).optim.betas == (0.9, 0.98)
    for raw, message in [
        ({"optim": {"betas": [0.9]}}, "optim.betas: expected a list of 2 numbers, got [0.9] (list)"),
        ({"optim": {"betas": [0.9, "x"]}}, "optim.betas[1]: expected a number, got 'x' (str)"),
        ({"data": {"train": [{"path": "a", "weight": "heavy"}]}},
         "data.train[0].weight: expected a number, got 'heavy' (str)"),
        ({"data": {"train": 3}}, "data.train: expected a shard set directory or a list of them, got 3 (int)"),
        ({"model": "tiny"}, "model: expected a mapping, got 'tiny' (str)"),
        ({"optim": [1]}, "optim: expected a mapping, got [1] (list)"),
        ({"compile": True, "compile_options": ["x"]},
         "compile_options: expected a mapping, got ['x'] (list)"),
        ({"model": {"preset": 3}}, "model.preset: expected a string, got 3 (int)"),
    ]:
        with pytest.raises(ConfigError) as e:
            train_config_from_dict(raw)
        assert str(e.value) == message


def test_max_steps_never_runs_past_the_schedule() -> None:
    """max_steps stops early; one beyond optim.total_steps (steps at lr end_lr = 0) is refused, naming
    both fields."""
    base = [*TINY_SET, "optim.warmup_steps=5"]
    assert load_train_config(None, [*base, "optim.total_steps=80", "max_steps=80"]).last_step == 80
    assert load_train_config(None, [*base, "optim.total_steps=80", "max_steps=30"]).last_step == 30
    assert load_train_config(None, [*base, "optim.total_steps=80"]).last_step == 80
    with pytest.raises(ConfigError) as e:
        load_train_config(None, [*base, "optim.total_steps=80", "max_steps=100"])
    assert str(e.value).startswith("max_steps: 100 exceeds optim.total_steps 80, where the learning-rate "
                                   "schedule ends (from there on lr = optim.end_lr = 0)")


@pytest.mark.slow
def test_a_wrong_type_stops_the_trainer_before_any_process_talks(tmp_path: Path) -> None:
    """`roberta-ds train` under the deepspeed launcher: both ranks refuse the config at once (exit 1,
    the message, no traceback), before discovery, the process group or DeepSpeed."""
    from launch import trainer_command

    from roberta_ds.quickstart.pipeline import launcher_env

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {preset: tiny}\noptim: {lr: abc}\ndata: {train: [data/train]}\n")
    proc = subprocess.run(trainer_command(["--config", str(cfg)], ranks=2), env=launcher_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=180, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert out.count("roberta-ds train: error: optim.lr: expected a number, got 'abc' (str)") == 2, out
    assert "Traceback" not in out and "[roberta-ds] rank" not in out and "init_distributed" not in out, out
