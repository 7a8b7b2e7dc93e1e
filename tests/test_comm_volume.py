"""The planner's communication model against what DeepSpeed really sends: 2 CPU ranks (gloo), the real
engine, DeepSpeed's comms logger, our comms.json (roberta_ds/engine/comm_report.py).

One run per ZeRO stage (bf16, fp32 gradient accumulation, tiny model, micro 2 x accumulation 2 x 2
ranks, 3 steps of which the last 2 are measured). The bytes each rank sends per optimizer step, by
kind, must equal `plan_model.comm_bytes_per_step` for the model's parameter count (from the
planner's own `param_count` of the run's model config) within DeepSpeed's alignment padding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch import run_trainer, tiny_args

from roberta_ds.checkpoint import commit as ckpt
from roberta_ds.config import ModelConfig
from roberta_ds.engine import comm_report
from roberta_ds.plan.model import comm_bytes_per_step, param_count

pytestmark = pytest.mark.slow

LOGGER = ["--ds-set", "comms_logger.enabled=true", "--ds-set", "comms_logger.prof_all=true"]


def _run(stage: int, tok: Path, shards: Path, out: Path) -> tuple[dict, int]:
    res = run_trainer(tiny_args(tok, shards, out, steps=3, ds_config=f"zero{stage}_bf16", extra=LOGGER),
                      ranks=2, timeout=240)
    assert res.returncode == 0, res.output[-4000:]
    assert "communication per optimizer step and rank (2 steps, 2 ranks)" in res.output
    rep = json.loads((out / "comms.json").read_text())
    meta = ckpt.committed(out / "checkpoints")[-1].meta
    return rep, param_count(ModelConfig(**meta["model"]))


@pytest.mark.parametrize("stage", [1, 2])
def test_bytes_per_step_match_the_plan(stage: int, small_tokenizer: Path, small_shards: Path,
                                       tmp_path: Path) -> None:
    rep, params = _run(stage, small_tokenizer, small_shards, tmp_path / "run")
    assert rep["steps"] == 2 and rep["world_size"] == 2
    sent = rep["bytes_sent_per_step"]
    reduce_b, gather_b = comm_bytes_per_step(params, stage, gpus=2, accumulation=2)
    assert sent["gradient"] == pytest.approx(reduce_b, rel=0.01), rep
    assert sent["parameter"] == pytest.approx(gather_b, rel=0.01), rep
    assert sent["other"] == 0, rep
    # The shape of it: ZeRO-1 one all-reduce per step, ZeRO-2 one per micro step (accumulation 2).
    big = [int(s) for s in rep["calls_per_step"]["all_reduce"] if int(s) > comm_report.CONTROL_BYTES]
    calls = sum(rep["calls_per_step"]["all_reduce"][str(s)] for s in big)
    assert calls == {1: 1, 2: 2}[stage], rep


def test_stage3_reduce_scatters_every_micro_step(small_tokenizer: Path, small_shards: Path,
                                                 tmp_path: Path) -> None:
    """ZeRO-3: the gradient reduce-scatter of the plan, A x Psi (N-1)/N. (Its parameter gathers depend
    on DeepSpeed's persistence and prefetch thresholds, which keep the tiny model's small tensors
    whole; the plan's 2 A x is the large-model bound.)"""
    rep, params = _run(3, small_tokenizer, small_shards, tmp_path / "run")
    reduce_b, _ = comm_bytes_per_step(params, 3, gpus=2, accumulation=2)
    assert rep["bytes_sent_per_step"]["gradient"] == pytest.approx(reduce_b, rel=0.01), rep
    assert sum(rep["calls_per_step"]["reduce_scatter_tensor"].values()) == 2, rep


def test_report_arithmetic() -> None:
    before = {"all_reduce": {4000: 1}}
    after = {"all_reduce": {4000: 3, 8: 2}, "all_gather_into_tensor": {2000: 2}}
    d = comm_report.subtract(after, before)
    assert d == {"all_reduce": {4000: 2, 8: 2}, "all_gather_into_tensor": {2000: 2}}
    rep = comm_report.report(d, steps=2, world_size=4)
    # Per step: one all-reduce of 4000 bytes sends 2 x 4000 x 3/4; one gathered 2000-byte shard sends
    # 2000 x 3; the 8-byte flag counts as control.
    want = {"gradient": 6000.0, "parameter": 6000.0, "control": 12.0, "other": 0.0}
    assert rep["bytes_sent_per_step"] == want
    assert rep["calls_per_step"]["all_reduce"] == {"8": 1.0, "4000": 1.0}
