"""checkpoint/commit.py and checkpoint/resume.py with a real DeepSpeed engine in this process (CPU,
gloo, world size 1): commit protocol (staging never loaded, keep_last pruning, atomic pointer),
`select()` cases, verification and fallback, pickle-safety refusal, compatibility refusals, RNG as JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from roberta_ds.checkpoint import commit as ckpt
from roberta_ds.comm import Comm
from roberta_ds.config import (
    config_to_dict,
    model_config,
)
from roberta_ds.engine.ds_config import (
    load_ds_config,
)
from roberta_ds.engine.optim import GuardedAdamW, param_groups
from roberta_ds.errors import CheckpointError
from roberta_ds.model.model import RobertaMLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from one_rank import one_rank_group  # noqa: E402
from test_ds_config import SHIPPED  # noqa: E402 - the shipped DeepSpeed JSONs, pinned there

REPO = Path(__file__).resolve().parents[1]
DS_CONFIGS = REPO / "ds_configs"
# ----------------------------------------------------------------------------------------------
# Checkpoints with a real DeepSpeed engine in this process (CPU, gloo, world size 1)

MODEL = model_config("tiny", vocab_size=512, max_positions=34)
TOKENIZER_SHA = "ab" * 32
GLOBAL_BATCH = 2


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    """A DeepSpeed ZeRO-1 fp32 engine over the tiny model with GuardedAdamW, as train.setup builds it."""
    import deepspeed

    with one_rank_group():
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
        eng, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds, dist_init_required=False)
        yield eng


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
    from roberta_ds.checkpoint.resume import plan_resume

    d = tmp_path / "checkpoints"
    with pytest.raises(Exception, match="injected crash"):
        _save(engine, d, 1, crash_at="save:before_rename")  # the staged manifest is already written
    assert ckpt.select(d, "auto", fallback=False) == []
    assert (
        plan_resume(d, "auto", False, Comm(), zero_stage=1, check=lambda c: None, log=lambda m: None)
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
    from roberta_ds.checkpoint.resume import plan_resume

    with pytest.raises(Exception, match="injected crash"):
        _save(engine, three, 4, crash_at="save:before_pointer")
    assert ckpt.read_pointer(three) == "step_00000003"
    assert _tags(ckpt.select(three, "auto", fallback=False)) == ["step_00000004"]
    point = plan_resume(
        three, "auto", False, Comm(), zero_stage=1, check=lambda c: None, log=lambda m: None
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
    from roberta_ds.checkpoint.resume import choose

    return choose(candidates, Comm(), fallback, check, log=lambda m: None)


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
    from roberta_ds.checkpoint.resume import check_compatible

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
    from roberta_ds.checkpoint.resume import plan_resume

    model = config_to_dict(dataclasses.replace(MODEL, **change.get("model", {})))
    check = _check_against(
        model, change.get("tokenizer", TOKENIZER_SHA), change.get("global_batch", GLOBAL_BATCH)
    )
    for fallback in (False, True):  # a mismatch is never "fallen back" from
        with pytest.raises(CheckpointError, match=message):
            plan_resume(three, "auto", fallback, Comm(), zero_stage=1, check=check, log=lambda m: None)


def test_resume_plan_same_world_and_allowed_changes(three: Path) -> None:
    from roberta_ds.checkpoint.resume import plan_resume

    regularised = config_to_dict(
        dataclasses.replace(MODEL, dropout=0.0, attention_dropout=0.0, activation_checkpointing=True)
    )
    point = plan_resume(
        three, "auto", False, Comm(), zero_stage=1, check=_check_against(regularised), log=lambda m: None
    )
    assert point is not None and not point.universal
    assert (point.chosen.tag, point.load_dir, point.load_tag) == ("step_00000003", three, "step_00000003")
    assert (
        plan_resume(
            three,
            "none",
            False,
            Comm(),
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
