"""engine/resolved.py: the run decided once, before any process group; and what reads it.

resolve_run is called here in pytest's process with a torch-style environment of 2 ranks (it talks
to no other process); the trainer's own use of it is exercised by every launch test."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from launch import tiny_args

from roberta_ds.data.sampling import BatchPlan, micro_batch_indices
from roberta_ds.data.tokenizer import load_tokenizer_info
from roberta_ds.engine.resolved import ResolvedRun, resolve_run
from roberta_ds.engine.runtime import Runtime
from roberta_ds.engine.setup import parse_args
from roberta_ds.errors import ConfigError, ShardFormatError


@pytest.fixture
def two_rank_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999", "ROBERTA_DS_MPI": "0",
                 "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(k, v)


def _resolve(small_tokenizer: Path, small_shards: Path, tmp_path: Path, *extra: str) -> ResolvedRun:
    argv = tiny_args(small_tokenizer, small_shards, tmp_path / "run", steps=4, global_batch=8, micro=2,
                     extra=list(extra))
    return resolve_run(parse_args(argv))


def test_the_run_is_decided_once_and_frozen(small_tokenizer, small_shards, tmp_path, two_rank_env) -> None:
    run = _resolve(small_tokenizer, small_shards, tmp_path)
    assert (run.env.rank, run.env.world_size) == (1, 2)
    assert run.plan == BatchPlan(global_batch=8, micro_batch=2, grad_accum=2, world_size=2)
    assert (run.precision, run.zero_stage, run.backend, run.device) == ("bf16", 2, "gloo", torch.device("cpu"))
    # "auto" decided for a CPU: sdpa over padded rows; the model built from it keeps that.
    assert (run.cfg.model.attention_kernel, run.cfg.model.unpad) == ("sdpa", False)
    assert run.tokenizer == load_tokenizer_info(small_tokenizer)
    assert run.out == tmp_path / "run"
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.plan = BatchPlan.of(1, 1, 1)  # type: ignore[misc]


def test_an_explicit_kernel_is_kept(small_tokenizer, small_shards, tmp_path, two_rank_env) -> None:
    run = _resolve(small_tokenizer, small_shards, tmp_path, "--set", "model.attention_kernel=varlen")
    assert (run.cfg.model.attention_kernel, run.cfg.model.unpad) == ("varlen", False)  # no flash on a CPU


def test_a_batch_the_world_cannot_split_is_refused_before_any_process_group(
        small_tokenizer, small_shards, tmp_path, two_rank_env) -> None:
    with pytest.raises(ConfigError, match="train_batch_size 6 is not divisible"):
        _resolve(small_tokenizer, small_shards, tmp_path, "--ds-set", "train_batch_size=6",
                 "--ds-set", "train_micro_batch_size_per_gpu=2")
    assert not torch.distributed.is_initialized()


def test_batch_plan_is_checked_where_it_is_multiplied() -> None:
    assert BatchPlan.of(2, 3, 4) == BatchPlan(24, 2, 3, 4) and BatchPlan.of(2, 3, 4).per_micro_step == 8
    with pytest.raises(ValueError, match="global_batch 10"):
        BatchPlan(10, 2, 3, 4)
    with pytest.raises(ValueError):
        BatchPlan.of(0, 1, 1)
    # Step 1 of a 24-sample global batch: micro-step 2, rank 3 takes the last 2 samples.
    assert micro_batch_indices(BatchPlan.of(2, 3, 4), 1, 2, 3).tolist() == [46, 47]


def test_runtime_is_built_by_keyword_and_reads_the_run(small_tokenizer, small_shards, tmp_path,
                                                      two_rank_env) -> None:
    run = _resolve(small_tokenizer, small_shards, tmp_path)
    with pytest.raises(TypeError):
        Runtime(run, {}, None, None, None, 0, 0, None)  # type: ignore[misc]  # kw_only: no positional bag
    rt = Runtime(run=run, ds=run.ds, engine=None, optimizer=None, data=None, data_identity={}, step=0,
                 skipped_total=0, rng_state=None)
    assert (rt.cfg, rt.plan, rt.env, rt.out, rt.tokenizer_sha256) == (
        run.cfg, run.plan, run.env, run.out, run.tokenizer.sha256)


def test_the_data_is_checked_against_the_run_once(small_tokenizer, small_shards, tmp_path, two_rank_env) -> None:
    """check_data_tokenizer: every set, training and validation, against the run's tokenizer and the
    model's vocabulary; a validation set of another tokenizer is refused by its path."""
    from roberta_ds.data.shard_set import read_manifest
    from roberta_ds.engine.setup import check_data_tokenizer

    run = _resolve(small_tokenizer, small_shards, tmp_path)
    train, valid = (read_manifest(small_shards / s) for s in ("train", "valid"))
    check_data_tokenizer(run, {"t": train, "v": valid})
    other = dataclasses.replace(valid, tokenizer_sha256="ab" * 32)
    with pytest.raises(ShardFormatError, match=r"^v/manifest.json: made with tokenizer sha256 abababab"):
        check_data_tokenizer(run, {"t": train, "v": other})
    small = _resolve(small_tokenizer, small_shards, tmp_path, "--set", "model.vocab_size=1000")
    with pytest.raises(ConfigError, match=r"model.vocab_size 1000 is smaller than the vocabulary of t \(2048\)"):
        check_data_tokenizer(small, {"t": train})
