"""The RoBERTa recipe in config.py: presets, schedules per preset, field errors, compile options;
the train command's own refusals and its exit path."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from roberta_ds.config import OPTIM_PRESETS, OptimConfig
from roberta_ds.config_load import apply_overrides, inductor_options, train_config_from_dict
from roberta_ds.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DS_CONFIGS = REPO / "ds_configs"
# ----------------------------------------------------------------------------------------------
# The RoBERTa recipe (config.py)


def test_optimizer_defaults_are_robertas() -> None:
    o = OptimConfig()
    assert (o.betas, o.eps, o.weight_decay) == ((0.9, 0.98), 1e-6, 0.01)
    assert (o.lr, o.warmup_steps, o.total_steps, o.end_lr) == (6e-4, 24_000, 500_000, 0.0)


@pytest.mark.parametrize(
    "preset, lr, warmup", [("roberta-base", 6e-4, 24_000), ("roberta-large", 4e-4, 30_000)]
)
def test_model_preset_picks_its_schedule(preset: str, lr: float, warmup: int) -> None:
    cfg = train_config_from_dict({"model": {"preset": preset}})
    assert cfg.model_preset == preset
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.total_steps) == (lr, warmup, 500_000)
    assert (cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay) == ((0.9, 0.98), 1e-6, 0.01)
    assert cfg.last_step == 500_000  # max_steps defaults to the schedule's length
    # An override changes one field; the rest of the preset's recipe stays.
    tuned = train_config_from_dict(
        {"model": {"preset": preset}, "optim": {"lr": 1e-4, "betas": [0.9, 0.999]}}
    )
    assert (tuned.optim.lr, tuned.optim.betas, tuned.optim.warmup_steps) == (1e-4, (0.9, 0.999), warmup)


def test_presets_shapes() -> None:
    assert OPTIM_PRESETS["roberta-large"].lr == 4e-4
    large = train_config_from_dict({"model": {"preset": "roberta-large"}}).model
    assert (large.hidden_size, large.num_layers, large.num_heads, large.ffn_size) == (1024, 24, 16, 4096)
    base = train_config_from_dict({}).model
    assert (base.hidden_size, base.num_layers, base.num_heads, base.dropout) == (768, 12, 12, 0.1)


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"optim": {"warmup_steps": 600_000}}, "optim.warmup_steps"),
        ({"optim": {"lr": 0}}, "optim.lr"),
        ({"optim": {"betas": [0.9, 1.0]}}, "optim.betas"),
        ({"optim": {"momentum": 0.9}}, "optim"),
        ({"data": {"max_seq_len": 600}}, "data.max_seq_len"),
        ({"save_interval": 0}, "save_interval"),
        ({"compile_options": {"coordinate_descent_tuning": True}}, "compile_options"),  # without compile
        ({"compile": True, "compile_options": ["coordinate_descent_tuning"]}, "compile_options"),
    ],
)
def test_bad_config_names_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}"):
        train_config_from_dict(raw)


def test_compile_options_sections_become_dotted_names() -> None:
    """`--set compile_options.triton.x=v` nests a section; torch.compile wants "triton.x" (a nested
    dict is refused as an unknown option "triton")."""
    raw = apply_overrides({}, ["compile_options.coordinate_descent_tuning=true",
                               "compile_options.triton.mix_order_reduction_split_size=32"])
    assert raw["compile_options"] == {"coordinate_descent_tuning": True,
                                      "triton": {"mix_order_reduction_split_size": 32}}
    flat = inductor_options(raw["compile_options"])
    assert flat == {"coordinate_descent_tuning": True, "triton.mix_order_reduction_split_size": 32}
    torch.compile(torch.nn.Linear(2, 2), options=flat)  # every name known to this torch's inductor
    assert inductor_options({}) == {}


def test_a_finished_run_exits_after_the_exit_handlers_without_finalizing() -> None:
    """`train._exit_after_run`: atexit handlers run (ours stop loader workers), the exit code is kept,
    and nothing is finalized after them (where gloo's threads once aborted a finished run)."""
    import subprocess

    script = (
        "import atexit\n"
        "atexit.register(lambda: print('exit handler ran', flush=True))\n"
        "class Finalized:\n"
        "    def __del__(self):\n"
        "        print('finalized', flush=True)\n"
        "keep = Finalized()\n"
        "from roberta_ds.engine.setup import _exit_after_run\n"
        "print('done', flush=True)\n"
        "_exit_after_run(3)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         check=False, cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 3, res.stderr[-2000:]
    assert res.stdout.split() == ["done", "exit", "handler", "ran"], res.stdout


def test_train_command_requires_tokenizer_and_data() -> None:
    from roberta_ds.engine.setup import parse_args, resolve_config

    with pytest.raises(ConfigError, match=r"^tokenizer: not set"):
        resolve_config(parse_args(["--set", "data.train=somewhere"]))
    # model.vocab_size given: the tokenizer is not opened here.
    with pytest.raises(ConfigError, match=r"^data.train: no training shard sets"):
        resolve_config(parse_args(["--set", "tokenizer=tok", "--set", "model.vocab_size=100"]))
    cfg = resolve_config(
        parse_args(
            [
                "--set",
                "tokenizer=tok",
                "--set",
                "model.vocab_size=100",
                "--set",
                "data.train=a:2,b",
                "--output-dir",
                "x",
                "--ds-config",
                "d.json",
            ]
        )
    )
    assert [(s.path, s.weight) for s in cfg.data.train] == [("a", 2.0), ("b", 1.0)]
    assert (cfg.output_dir, cfg.ds_config) == ("x", "d.json")
