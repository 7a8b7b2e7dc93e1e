"""engine/ds_config.py and ds_configs/*.json: loading, overrides, precision the device can run, the
batch arithmetic and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from roberta_ds.engine.ds_config import (
    batch_plan,
    check_precision_runs,
    load_ds_config,
    precision,
    zero_stage,
)
from roberta_ds.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DS_CONFIGS = REPO / "ds_configs"
# ----------------------------------------------------------------------------------------------
# DeepSpeed JSONs (ds_config.py, ds_configs/)

SHIPPED = {  # name: (precision, ZeRO stage)
    "zero1_bf16": ("bf16", 1),
    "zero2_bf16": ("bf16", 2),
    "zero3_bf16": ("bf16", 3),
    "zero2_fp16": ("fp16", 2),
    "zero2_offload": ("bf16", 2),
}


def test_a_precision_the_device_cannot_run_is_refused_naming_the_config() -> None:
    """fp16 on a CPU without native fp16 (DeepSpeed asks oneDNN: AVX512-FP16/AMX), or bf16 on a GPU
    without it (a V100), is refused before DeepSpeed's own bare ValueError, naming the config and the
    shipped one that runs."""
    fp16 = load_ds_config(DS_CONFIGS / "zero2_fp16.json")
    bf16 = load_ds_config(DS_CONFIGS / "zero2_bf16.json")
    with pytest.raises(ConfigError, match=r"^ds_config x\.json: fp16 is enabled, but DeepSpeed cannot run "
                                          r"fp16 on this CPU; use ds_configs/zero2_bf16\.json$"):
        check_precision_runs(fp16, "ds_config x.json", "CPU", fp16_ok=False, bf16_ok=True)
    with pytest.raises(ConfigError, match=r"bf16 on this GPU; use ds_configs/zero2_fp16\.json$"):
        check_precision_runs(bf16, "ds_config y.json", "GPU", fp16_ok=True, bf16_ok=False)
    with pytest.raises(ConfigError, match=r"fp16 on this CPU; use a config without fp16 and bf16 \(fp32\)$"):
        check_precision_runs(fp16, "ds_config x.json", "CPU", fp16_ok=False, bf16_ok=False)
    check_precision_runs(fp16, "x", "CPU", fp16_ok=True, bf16_ok=False)
    check_precision_runs(bf16, "x", "CPU", fp16_ok=False, bf16_ok=True)
    check_precision_runs({}, "x", "CPU", fp16_ok=False, bf16_ok=False)  # fp32 runs anywhere


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_ds_configs(name: str) -> None:
    ds = load_ds_config(DS_CONFIGS / f"{name}.json")
    assert ds["train_batch_size"] == 8192  # RoBERTa's 8K-sequence batch
    assert (precision(ds), zero_stage(ds)) == SHIPPED[name]
    # The RoBERTa recipe does not clip: the paper's Table 9 lists gradient clipping 0.0, fairseq's
    # examples/roberta/config/pretraining/base.yaml has clip_norm 0 (DeepSpeed: 0 = off).
    assert ds["gradient_clipping"] == 0.0
    assert "optimizer" not in ds and "scheduler" not in ds  # ours (optim.*), never DeepSpeed's
    plan = batch_plan(ds, 8)
    assert (plan.global_batch, plan.micro_batch, plan.grad_accum) == (8192, 32, 32)
    if name == "zero2_offload":
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_shipped_ds_config_files_are_all_tested() -> None:
    assert sorted(p.stem for p in DS_CONFIGS.glob("*.json")) == sorted(SHIPPED)


def test_ds_config_overrides_and_errors(tmp_path: Path) -> None:
    ds = load_ds_config(
        DS_CONFIGS / "zero2_bf16.json",
        ["bf16.enabled=false", "train_batch_size=16", "zero_optimization.stage=3"],
    )
    assert (precision(ds), ds["train_batch_size"], zero_stage(ds)) == ("fp32", 16, 3)
    assert load_ds_config(DS_CONFIGS / "zero2_bf16.json")["bf16"]["enabled"] is True  # the file is untouched

    with pytest.raises(ConfigError, match=r"file not found \(did you mean .*ds_configs/zero2_bf16.json\?\)"):
        load_ds_config(tmp_path / "zero2_bf16.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "train_batch_size": 8,\n  oops\n}')
    with pytest.raises(ConfigError, match=rf"ds_config {bad}: invalid JSON at line 3"):
        load_ds_config(bad)
    owned = tmp_path / "owned.json"
    owned.write_text(json.dumps({"train_batch_size": 8, "optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match=r"has an 'optimizer' section.*training config \(optim\.\*\)"):
        load_ds_config(owned)


def test_batch_arithmetic() -> None:
    plan = batch_plan({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2}, 2)
    assert (plan.global_batch, plan.micro_batch, plan.grad_accum, plan.world_size) == (8, 2, 2, 2)
    assert (
        batch_plan({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, 2).global_batch
        == 24
    )
    assert batch_plan({"train_batch_size": 24, "gradient_accumulation_steps": 3}, 2).micro_batch == 4
    with pytest.raises(ConfigError) as e:
        batch_plan(
            {"train_batch_size": 8192, "train_micro_batch_size_per_gpu": 32}, 3, source="ds_config x.json"
        )
    assert str(e.value).startswith(
        "ds_config x.json: train_batch_size 8192 is not divisible by train_micro_batch_size_per_gpu 32 x "
        "world size 3 = 96 (8192 / 96 = 85.333 accumulation steps)"
    )
    with pytest.raises(
        ConfigError, match=r"gradient_accumulation_steps 4 contradicts train_batch_size 8 = 2 x 2 x 2"
    ):
        batch_plan(
            {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}, 2
        )
    with pytest.raises(
        ConfigError, match=r"train_batch_size 8 is not divisible by gradient_accumulation_steps 3"
    ):
        batch_plan({"train_batch_size": 8, "gradient_accumulation_steps": 3}, 1)
    with pytest.raises(ConfigError, match=r"set train_batch_size and train_micro_batch_size_per_gpu"):
        batch_plan({"train_batch_size": 8}, 1)
