"""Unit tests of the trainer's pure parts and its checkpoint protocol, in this one process (no launcher).

- config.py / optim.py: the RoBERTa recipe (AdamW betas (0.9, 0.98), eps 1e-6, weight decay 0.01
  on matrices only; linear warmup + decay, base 6e-4 / 24K / 500K, large 4e-4 / 30K), `lr_at`,
  `param_groups`, `GuardedAdamW` (a skipped step leaves parameters and state bitwise unchanged);
- ds_config.py and ds_configs/*.json: loading, overrides, the batch arithmetic and its errors;
- checkpoint.py / resume.py with a real DeepSpeed engine (CPU, gloo, world size 1, created in this
  process): commit protocol (staging never loaded, keep_last pruning, atomic pointer), `select()`
  cases, verification and fallback, pickle-safety refusal, compatibility refusals, RNG as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from roberta_ds import checkpoint as ckpt
from roberta_ds.config import (
    OPTIM_PRESETS,
    OptimConfig,
    apply_overrides,
    config_to_dict,
    inductor_options,
    model_config,
    train_config_from_dict,
)
from roberta_ds.ds_config import batch_plan, check_precision_runs, load_ds_config, precision, zero_stage
from roberta_ds.errors import CheckpointError, ConfigError
from roberta_ds.model import RobertaMLM
from roberta_ds.optim import GuardedAdamW, lr_at, param_groups

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
        "from roberta_ds.train import _exit_after_run\n"
        "print('done', flush=True)\n"
        "_exit_after_run(3)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         check=False, cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 3, res.stderr[-2000:]
    assert res.stdout.split() == ["done", "exit", "handler", "ran"], res.stdout


def test_train_command_requires_tokenizer_and_data() -> None:
    from roberta_ds.train import parse_args, resolve_config

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


# ----------------------------------------------------------------------------------------------
# The schedule and the optimizer (optim.py)


def test_lr_schedule_base() -> None:
    o = OptimConfig()
    assert lr_at(0, o) == pytest.approx(6e-4 / 24_000)
    assert lr_at(11_999, o) == pytest.approx(3e-4)
    assert lr_at(23_999, o) == pytest.approx(6e-4)
    assert lr_at(24_000, o) == pytest.approx(6e-4)
    assert lr_at(262_000, o) == pytest.approx(3e-4)  # half way down the decay
    assert lr_at(500_000, o) == 0.0 and lr_at(600_000, o) == 0.0
    warm = [lr_at(s, o) for s in range(0, 24_000, 1000)]
    decay = [lr_at(s, o) for s in range(24_000, 500_001, 10_000)]
    assert warm == sorted(warm) and decay == sorted(decay, reverse=True)


def test_lr_schedule_large_and_edges() -> None:
    large = OPTIM_PRESETS["roberta-large"]
    assert lr_at(29_999, large) == pytest.approx(4e-4)
    assert lr_at(30_000 + (500_000 - 30_000) // 2, large) == pytest.approx(2e-4)
    no_warmup = OptimConfig(lr=1e-3, warmup_steps=0, total_steps=10, end_lr=1e-4)
    assert lr_at(0, no_warmup) == pytest.approx(1e-3)
    assert lr_at(5, no_warmup) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(10, no_warmup) == pytest.approx(1e-4) and lr_at(99, no_warmup) == pytest.approx(1e-4)


def _tiny_model(vocab: int = 512, seq: int = 32, **kw: Any) -> RobertaMLM:
    torch.manual_seed(0)
    return RobertaMLM(model_config("tiny", vocab_size=vocab, max_positions=seq + 2, **kw))


def test_weight_decay_only_on_matrices() -> None:
    model = _tiny_model()
    groups = param_groups(model, 0.01)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    assert sum(len(g["params"]) for g in groups) == len(names)  # each parameter once (tied decoder too)
    assert {
        "embeddings.word.weight",
        "embeddings.position.weight",
        "layers.0.attn.qkv.weight",
        "layers.1.ffn.proj.weight",
        "head.dense.weight",
    } <= decay
    assert all(n.endswith(".bias") or "norm" in n for n in no_decay)
    assert all(not n.endswith(".bias") and "norm" not in n for n in decay)
    assert {
        "head.bias",
        "embeddings.norm.weight",
        "layers.0.attn_norm.weight",
        "layers.1.ffn.fc.bias",
    } <= no_decay


def _small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))


def _grads(model: torch.nn.Module, seed: int, poison: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    if poison:
        grads[3].view(-1)[5] = float("nan")
    return grads


def _set_grads(model: torch.nn.Module, grads: list[torch.Tensor]) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_guarded_adamw_skips_nonfinite_steps_bitwise(fused: bool) -> None:
    """(finite, NaN, finite) with GuardedAdamW == (finite, finite) with torch's AdamW, bitwise."""
    kw: dict[str, Any] = {"lr": 1e-2, "betas": (0.9, 0.98), "eps": 1e-6, "fused": fused}
    ours, ref = _small_net(), _small_net()
    opt = GuardedAdamW(param_groups(ours, 0.01), **kw)
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.01), **kw)

    _set_grads(ours, _grads(ours, 1))
    opt.step()
    assert float(opt.skipped) == 0.0
    before = [p.detach().clone() for p in ours.parameters()]
    state = {k: v.clone() for k, v in opt.state[next(ours.parameters())].items()}
    _set_grads(ours, _grads(ours, 2, poison=True))
    opt.step()
    assert float(opt.skipped) == 1.0
    assert all(torch.equal(a, p) for a, p in zip(before, ours.parameters())), (
        "a skipped step moved parameters"
    )
    after = opt.state[next(ours.parameters())]
    assert all(torch.equal(state[k], after[k]) for k in state), "a skipped step changed Adam's state"
    _set_grads(ours, _grads(ours, 3))
    opt.step()

    for seed in (1, 3):
        _set_grads(ref, _grads(ref, seed))
        ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))


def test_guarded_adamw_follows_the_agreed_flag() -> None:
    """Finite gradients here, but another rank flagged: the all-reduced flag decides (the skip is global)."""
    model = _small_net()
    calls: list[float] = []

    def other_rank_flags(flag: torch.Tensor) -> None:
        calls.append(float(flag))
        flag.fill_(1.0)

    opt = GuardedAdamW(param_groups(model, 0.01), lr=1e-2, fused=False, all_reduce_max=other_rank_flags)
    before = [p.detach().clone() for p in model.parameters()]
    _set_grads(model, _grads(model, 1))
    opt.step()
    assert calls == [0.0] and float(opt.skipped) == 1.0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


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


# ----------------------------------------------------------------------------------------------
# Checkpoints with a real DeepSpeed engine in this process (CPU, gloo, world size 1)

MODEL = model_config("tiny", vocab_size=512, max_positions=34)
TOKENIZER_SHA = "ab" * 32
GLOBAL_BATCH = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    """A DeepSpeed ZeRO-1 fp32 engine over the tiny model with GuardedAdamW, as train.setup builds it."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {
            "DS_ACCELERATOR": "cpu",
            "LOCAL_RANK": "0",
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
        }.items():
            mp.setenv(k, v)
        mp.setenv(
            "TORCH_EXTENSIONS_DIR",
            os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")),
        )
        import deepspeed

        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
        try:
            torch.manual_seed(0)
            model = RobertaMLM(MODEL)
            opt = GuardedAdamW(param_groups(model, 0.01), lr=1e-3, fused=False)
            ds = {
                "train_batch_size": GLOBAL_BATCH,
                "train_micro_batch_size_per_gpu": GLOBAL_BATCH,
                "zero_optimization": {"stage": 1},
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 10**9,
            }
            eng, _, _, _ = deepspeed.initialize(
                model=model, optimizer=opt, config=ds, dist_init_required=False
            )
            yield eng
        finally:
            torch.distributed.destroy_process_group()


def _meta(step: int, **changes: Any) -> dict[str, Any]:
    """What loop.checkpoint_meta records, reduced to what checkpoint/resume read."""
    return {
        "model": config_to_dict(MODEL),
        "tokenizer_sha256": TOKENIZER_SHA,
        "world_size": 1,
        "global_batch": GLOBAL_BATCH,
        "zero_stage": 1,
        "samples_consumed": step * GLOBAL_BATCH,
        **changes,
    }


def _train_step(engine: Any) -> None:
    ids = torch.randint(5, MODEL.vocab_size, (GLOBAL_BATCH, 32))
    pos = torch.tensor([[1, 2, 3]] * GLOBAL_BATCH)
    loss = engine(ids, pos, ids.gather(1, pos))
    engine.backward(loss)
    engine.step()


def _save(engine: Any, ckpt_dir: Path, step: int, keep_last: int = 100, crash_at: str | None = None) -> Path:
    def fault(point: str) -> None:
        if point == crash_at:
            raise RuntimeError(f"injected crash at {point}")

    return ckpt.save(engine, ckpt_dir, step, _meta(step), keep_last, fault=fault)


def _dir_names(ckpt_dir: Path) -> set[str]:
    return {p.name for p in ckpt_dir.iterdir()}


def _tags(candidates: list[ckpt.Committed]) -> list[str]:
    return [c.tag for c in candidates]


@pytest.fixture(scope="module")
def three_saved(engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("three") / "checkpoints"
    for step in (1, 2, 3):
        _save(engine, d, step)
    return d


@pytest.fixture
def three(three_saved: Path, tmp_path: Path) -> Path:
    """A checkpoint directory with committed steps 1, 2, 3 (`latest` -> step 3), this test's own copy."""
    return Path(shutil.copytree(three_saved, tmp_path / "checkpoints"))


def test_ds_configs_are_accepted_by_deepspeed(engine: Any) -> None:
    """DeepSpeed's own config parser takes every shipped JSON (no unknown or invalid fields)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    for name in SHIPPED:
        parsed = DeepSpeedConfig(load_ds_config(DS_CONFIGS / f"{name}.json"))
        assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu) == (8192, 32)
        assert parsed.gradient_accumulation_steps == 8192 // 32  # world size 1 here
        assert parsed.zero_optimization_stage == SHIPPED[name][1]


def test_save_commits_with_manifest_and_pointer(three: Path) -> None:
    tag_dir = three / "step_00000003"
    meta = ckpt.read_meta(tag_dir)
    assert (meta["step"], meta["tag"], meta["meta_version"]) == (3, "step_00000003", ckpt.META_VERSION)
    on_disk = {p.name for p in tag_dir.iterdir()} - {ckpt.META_NAME}
    assert set(meta["files"]) == on_disk and ckpt.rng_file(0) in on_disk
    assert any(n.endswith("_model_states.pt") for n in on_disk) and any(
        n.endswith("_optim_states.pt") for n in on_disk
    )
    ckpt.verify_files(tag_dir, meta, shard=lambda i: True)
    # DeepSpeed's tools read `latest` as a bare tag.
    assert (three / ckpt.POINTER_NAME).read_text() == "step_00000003"
    assert not [n for n in _dir_names(three) if n.startswith((ckpt.STAGING_PREFIX, ckpt.TRASH_PREFIX, "."))]
    assert _tags(ckpt.committed(three)) == ["step_00000001", "step_00000002", "step_00000003"]


@pytest.mark.parametrize("crash_at", ["save:written", "save:before_rename"])
def test_crashed_save_leaves_staging_that_is_never_chosen(engine: Any, three: Path, crash_at: str) -> None:
    with pytest.raises(Exception, match="injected crash"):
        _save(engine, three, 4, crash_at=crash_at)
    assert ".staging-step_00000004" in _dir_names(three) and "step_00000004" not in _dir_names(three)
    assert ckpt.read_pointer(three) == "step_00000003"
    assert _tags(ckpt.committed(three)) == ["step_00000001", "step_00000002", "step_00000003"]
    assert _tags(ckpt.select(three, "auto", fallback=True)) == [
        "step_00000003",
        "step_00000002",
        "step_00000001",
    ]
    # The next save of that step drops the leftover and commits normally.
    _save(engine, three, 4)
    assert ".staging-step_00000004" not in _dir_names(three)
    assert _tags(ckpt.select(three, "auto", fallback=False)) == ["step_00000004"]


def test_staging_only_directory_starts_fresh_and_is_cleaned(engine: Any, tmp_path: Path) -> None:
    """A first save that never committed: nothing to resume (step 0 is right), and the leftover goes."""
    from roberta_ds.resume import plan_resume

    d = tmp_path / "checkpoints"
    with pytest.raises(Exception, match="injected crash"):
        _save(engine, d, 1, crash_at="save:before_rename")  # the staged manifest is already written
    assert ckpt.select(d, "auto", fallback=False) == []
    assert (
        plan_resume(d, "auto", False, ckpt.Comm(), zero_stage=1, check=lambda c: None, log=lambda m: None)
        is None
    )
    assert ".staging-step_00000001" not in _dir_names(d)


def test_explicit_resume_of_a_staging_directory_is_refused(engine: Any, three: Path) -> None:
    with pytest.raises(Exception, match="injected crash"):
        _save(engine, three, 4, crash_at="save:before_rename")  # the staged manifest is already written
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        ckpt.select(three, str(three / ".staging-step_00000004"), fallback=False)


def test_crash_before_pointer_resumes_the_commit_and_repairs_the_pointer(engine: Any, three: Path) -> None:
    """The rename is the commit; `latest` (for DeepSpeed's tools) may lag one checkpoint behind it."""
    from roberta_ds.resume import plan_resume

    with pytest.raises(Exception, match="injected crash"):
        _save(engine, three, 4, crash_at="save:before_pointer")
    assert ckpt.read_pointer(three) == "step_00000003"
    assert _tags(ckpt.select(three, "auto", fallback=False)) == ["step_00000004"]
    point = plan_resume(
        three, "auto", False, ckpt.Comm(), zero_stage=1, check=lambda c: None, log=lambda m: None
    )
    assert point is not None and point.chosen.tag == "step_00000004"
    assert ckpt.read_pointer(three) == "step_00000004"


def test_pointer_is_replaced_atomically(engine: Any, three: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while publishing `latest` leaves the previous pointer whole (written aside, renamed)."""
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).name == ckpt.POINTER_NAME:
            raise OSError("injected: no space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointError, match="injected: no space left on device"):
        _save(engine, three, 4)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (three / ckpt.POINTER_NAME).read_text() == "step_00000003"
    assert not [n for n in _dir_names(three) if n.startswith(".")]  # no temp file left beside it
    assert (three / "step_00000004" / ckpt.META_NAME).is_file()  # committed before the pointer


def test_keep_last_prunes_oldest_with_their_universal_copies(engine: Any, tmp_path: Path) -> None:
    d = tmp_path / "checkpoints"
    _save(engine, d, 1, keep_last=2)
    (d / "step_00000001_universal" / "zero").mkdir(parents=True)  # as resume.convert_to_universal leaves it
    (d / ".trash-step_00000000.123").mkdir()  # left by a crash during an earlier prune
    for step in (2, 3, 4):
        _save(engine, d, step, keep_last=2)
    assert _tags(ckpt.committed(d)) == ["step_00000003", "step_00000004"]
    assert _dir_names(d) - {"zero_to_fp32.py", "zero_to_torch.py"} == {
        "step_00000003",
        "step_00000004",
        "latest",
    }
    # The checkpoint `latest` names is never pruned, even when older than keep_last allows.
    (d / ckpt.POINTER_NAME).write_text("step_00000003")
    ckpt.prune(d, keep_last=1)
    assert _tags(ckpt.committed(d)) == ["step_00000003", "step_00000004"]


def test_select_cases(three: Path, tmp_path: Path) -> None:
    assert ckpt.select(three, "none", fallback=False) == []
    assert ckpt.select(tmp_path / "absent", "auto", fallback=False) == []  # a new run
    (tmp_path / "empty").mkdir()
    assert ckpt.select(tmp_path / "empty", "auto", fallback=False) == []
    assert _tags(ckpt.select(three, "auto", fallback=False)) == ["step_00000003"]
    assert _tags(ckpt.select(three, "auto", fallback=True)) == [
        "step_00000003",
        "step_00000002",
        "step_00000001",
    ]
    # --resume PATH: a tag directory (exactly that one), or a checkpoints directory (as auto).
    assert _tags(ckpt.select(three, str(three / "step_00000002"), fallback=False)) == ["step_00000002"]
    assert _tags(ckpt.select(tmp_path / "absent", str(three), fallback=False)) == ["step_00000003"]
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        ckpt.select(three, str(tmp_path / "nope"), fallback=False)
    with pytest.raises(CheckpointError, match="holds no committed checkpoint"):
        ckpt.select(three, str(tmp_path / "empty"), fallback=False)
    (three / "step_00000009").mkdir()  # a tag directory without a manifest is not committed
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        ckpt.select(three, str(three / "step_00000009"), fallback=False)
    assert _tags(ckpt.select(three, "auto", fallback=False)) == ["step_00000003"]
    # `latest` behind the newest commit (a job killed between commit and pointer): the commit wins.
    (three / ckpt.POINTER_NAME).write_text("step_00000002")
    assert _tags(ckpt.select(three, "auto", fallback=False)) == ["step_00000003"]
    # `latest` names a checkpoint newer than any left (deleted or damaged after its commit).
    (three / ckpt.POINTER_NAME).write_text("step_00000009")
    with pytest.raises(
        CheckpointError,
        match=r"names step_00000009, which is not a committed checkpoint.*"
        r"--resume-fallback",
    ):
        ckpt.select(three, "auto", fallback=False)
    assert _tags(ckpt.select(three, "auto", fallback=True)) == [
        "step_00000003",
        "step_00000002",
        "step_00000001",
    ]
    # `latest` with every checkpoint gone.
    for tag in ("step_00000001", "step_00000002", "step_00000003"):
        shutil.rmtree(three / tag)
    for fallback in (False, True):
        with pytest.raises(
            CheckpointError, match="holds no committed checkpoint any more. Refusing to start from step 0"
        ):
            ckpt.select(three, "auto", fallback=fallback)


@pytest.mark.parametrize("pointer", ["", "garbage", "../step_00000001", "step_0000000x"])
def test_corrupt_pointer_is_an_error_never_a_restart(three: Path, pointer: str) -> None:
    (three / ckpt.POINTER_NAME).write_text(pointer)
    for fallback in (False, True):
        with pytest.raises(CheckpointError, match=r"latest: corrupt pointer"):
            ckpt.select(three, "auto", fallback=fallback)


def test_missing_pointer_never_restarts_from_step_0(three: Path) -> None:
    """Several checkpoints but no `latest`: an error naming the pointer and the way out, never []
    (a silent restart) and never a guess."""
    (three / ckpt.POINTER_NAME).unlink()
    with pytest.raises(CheckpointError, match=r"latest: missing, but .* holds 3 checkpoints .*--resume"):
        ckpt.select(three, "auto", fallback=False)
    with pytest.raises(CheckpointError, match=r"latest: missing"):
        ckpt.select(three, "auto", fallback=True)


def test_missing_pointer_after_the_first_commit_resumes_it(three: Path) -> None:
    """A job killed between its first commit (the rename) and the first pointer write: the one
    committed checkpoint is used (issue: kill -9 between the shards and the pointer update)."""
    for tag in ("step_00000001", "step_00000002"):
        shutil.rmtree(three / tag)
    (three / ckpt.POINTER_NAME).unlink()
    assert _tags(ckpt.select(three, "auto", fallback=False)) == ["step_00000003"]


def _choose(candidates: list[ckpt.Committed], fallback: bool, check=lambda c: None) -> ckpt.Committed | None:
    from roberta_ds.resume import choose

    return choose(candidates, ckpt.Comm(), fallback, check, log=lambda m: None)


def _largest_pt(tag_dir: Path) -> Path:
    return max(tag_dir.glob("*.pt"), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("flip", "sha256 differs"),
        ("truncate", "truncated or replaced"),
        ("delete", "missing"),
        ("extra", "not listed in"),
        ("manifest", "corrupt manifest"),
    ],
)
def test_damaged_checkpoint_is_refused_or_falls_back(three: Path, damage: str, message: str) -> None:
    victim = _largest_pt(three / "step_00000003")
    if damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-10])
    elif damage == "delete":
        victim.unlink()
    elif damage == "extra":  # DeepSpeed's loaders glob *_optim_states.pt: an unlisted file would be read
        shutil.copy(victim, victim.with_name("zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    else:
        (victim.parent / ckpt.META_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{message}.*--resume-fallback uses the previous complete"):
        _choose(ckpt.select(three, "auto", fallback=False), fallback=False)
    assert _choose(ckpt.select(three, "auto", fallback=True), fallback=True).tag == "step_00000002"


def test_checkpoint_that_would_run_code_is_refused(three: Path) -> None:
    """A .pt whose pickle references something beyond tensors is refused before DeepSpeed unpickles it,
    even with a manifest rewritten to match (checksums do not prove origin)."""
    tag_dir = three / "step_00000003"
    victim = _largest_pt(tag_dir)
    torch.save({"state": argparse.Namespace(x=1)}, victim)
    meta = json.loads((tag_dir / ckpt.META_NAME).read_text())
    meta["files"][victim.name] = {"bytes": victim.stat().st_size, "sha256": ckpt.file_sha256(victim)}
    (tag_dir / ckpt.META_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"refused to load: it references \['argparse.Namespace'\]"):
        _choose(ckpt.select(three, "auto", fallback=False), fallback=False)


def _check_against(model: dict[str, Any], tokenizer: str = TOKENIZER_SHA, global_batch: int = GLOBAL_BATCH):
    from roberta_ds.resume import check_compatible

    return lambda c: check_compatible(
        c.meta, model=model, tokenizer_sha256=tokenizer, global_batch=global_batch, where=c.path
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tokenizer": "cd" * 32}, r"trained with tokenizer sha256 ababababab\S*, but this run's tokenizer"),
        (
            {"model": {"hidden_size": 128}},
            r"another model shape \(model.hidden_size: checkpoint 64 vs config 128\)",
        ),
        ({"model": {"vocab_size": 1024}}, r"model.vocab_size: checkpoint 512 vs config 1024"),
        ({"global_batch": 4}, r"trained with global batch 2, this run has 4"),
    ],
)
def test_resume_refuses_other_tokenizer_shape_or_batch(
    three: Path, change: dict[str, Any], message: str
) -> None:
    from roberta_ds.resume import plan_resume

    model = config_to_dict(dataclasses.replace(MODEL, **change.get("model", {})))
    check = _check_against(
        model, change.get("tokenizer", TOKENIZER_SHA), change.get("global_batch", GLOBAL_BATCH)
    )
    for fallback in (False, True):  # a mismatch is never "fallen back" from
        with pytest.raises(CheckpointError, match=message):
            plan_resume(three, "auto", fallback, ckpt.Comm(), zero_stage=1, check=check, log=lambda m: None)


def test_resume_plan_same_world_and_allowed_changes(three: Path) -> None:
    from roberta_ds.resume import plan_resume

    regularised = config_to_dict(
        dataclasses.replace(MODEL, dropout=0.0, attention_dropout=0.0, activation_checkpointing=True)
    )
    point = plan_resume(
        three, "auto", False, ckpt.Comm(), zero_stage=1, check=_check_against(regularised), log=lambda m: None
    )
    assert point is not None and not point.universal
    assert (point.chosen.tag, point.load_dir, point.load_tag) == ("step_00000003", three, "step_00000003")
    assert (
        plan_resume(
            three,
            "none",
            False,
            ckpt.Comm(),
            zero_stage=1,
            check=_check_against(regularised),
            log=lambda m: None,
        )
        is None
    )


def test_checkpoint_loads_into_the_engine(engine: Any, tmp_path: Path) -> None:
    """What train.setup does with a ResumePoint: the engine gets back the saved weights exactly."""
    d = tmp_path / "checkpoints"
    _save(engine, d, 1)
    saved = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    _train_step(engine)
    assert any(not torch.equal(saved[k], v) for k, v in engine.module.state_dict().items())
    loaded, _ = engine.load_checkpoint(
        str(d),
        tag="step_00000001",
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
        load_module_strict=True,
    )
    assert loaded is not None
    assert all(torch.equal(saved[k], v) for k, v in engine.module.state_dict().items())


def test_rng_state_round_trips_through_json() -> None:
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    state = json.loads(json.dumps(ckpt.capture_rng()))
    expected = (torch.rand(4), np.random.rand(4), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    ckpt.restore_rng(state)
    got = (torch.rand(4), np.random.rand(4), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_manifest_errors(three: Path) -> None:
    tag_dir = three / "step_00000002"
    (tag_dir / ckpt.META_NAME).write_text("[]")
    with pytest.raises(CheckpointError, match="corrupt manifest"):
        ckpt.read_meta(tag_dir)
    assert _tags(ckpt.committed(three)) == ["step_00000001", "step_00000003"]  # never loaded
    (tag_dir / ckpt.META_NAME).write_text(json.dumps({"step": 2}))
    with pytest.raises(CheckpointError, match="manifest lacks 'files'"):
        ckpt.read_meta(tag_dir)


def test_deepspeed_launcher_without_its_script_runs_as_a_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeepSpeed installed with `pip --target` (the GPU machines) has no `deepspeed` script beside the
    interpreter: the launcher is then the same entry point run as a module, and it starts."""
    import subprocess
    import sys

    from roberta_ds.quickstart import deepspeed_launcher

    real = sys.executable
    assert deepspeed_launcher() == [str(Path(real).parent / "deepspeed")]  # this venv has the script
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python3"))
    cmd = deepspeed_launcher()
    assert cmd == [str(tmp_path / "python3"), "-m", "deepspeed.launcher.runner"]
    proc = subprocess.run([real, *cmd[1:], "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "--num_gpus" in proc.stdout, proc.stderr[-2000:]
