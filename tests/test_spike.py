"""The loss-spike policy (spike_config.py, spike.py, rollback.py): judged per step, skipped like a
non-finite step, or rolled back with the spike's batches never consumed again, even after a resume.

Units: the judgement, the action, the settings' checks, the fault grammar, the batches a rollback
skips. Launches (2 ranks, bf16 ZeRO-2, the tiny model, 8 steps, a checkpoint every 2 steps; spikes
injected with ROBERTA_DS_FAULTS `spike[=FACTOR]@loss|grad`):
- skip: a loss spike (rank 0, step index 4) and a gradient-only spike (rank 1, index 5) are both
  skipped on every rank; the checkpoints around them (step_4, step_6) are bitwise equal;
- rollback: a loss spike at index 5 rolls back to step_4, whose batches 4 and 5 (skip_batches=2)
  are never consumed again (the `data_batch` the loader delivered, in metrics.jsonl), LR x 0.5;
- resume after the rollback: a new launch from the re-committed step_4 takes the same batches and
  reaches bitwise the same losses as the rolled-back run, and the list is in every later manifest.

Cost: 3 two-rank launches, 125 s on the shared 2-core machine (under load).
"""

from __future__ import annotations

import pytest

from roberta_ds.checkpoint import commit as ckpt
from roberta_ds.config import OptimConfig
from roberta_ds.data.order import DataOrder
from roberta_ds.engine.optim import lr_at
from roberta_ds.engine.rollback import batches_to_skip
from roberta_ds.engine.spike import action, judge
from roberta_ds.errors import ConfigError
from roberta_ds.launch.faults import Faults, parse, spike_factor
from roberta_ds.spike_config import SpikeConfig

SPIKE_SET = ["--set", "spike.min_history=3", "--set", "spike.window=4"]


# ----------------------------------------------------------------------------------------------
# Units


def test_judge_against_the_medians() -> None:
    cfg = SpikeConfig(policy="skip", loss_factor=2.0, grad_norm_factor=10.0, window=4, min_history=3)
    losses, norms = [7.6, 7.5, 7.4], [1.0, 2.0, 3.0]
    assert judge(7.3, 2.5, losses, norms, cfg) == []
    assert judge(15.1, 2.5, losses, norms, cfg) == ["loss 15.1 > 2 x median 7.5"]
    assert judge(7.3, 21.0, losses, norms, cfg) == ["grad norm 21 > 10 x median 2"]
    assert len(judge(100.0, 100.0, losses, norms, cfg)) == 2
    assert judge(100.0, 100.0, losses[:2], norms[:2], cfg) == []  # too little history yet
    assert judge(float("nan"), float("inf"), losses, norms, cfg) == []  # the non-finite path's business
    no_loss = SpikeConfig(policy="skip", loss_factor=None, window=4, min_history=3)
    assert judge(100.0, None, losses, norms, no_loss) == []


def test_action_rolls_back_until_max_rollbacks() -> None:
    cfg = SpikeConfig(policy="rollback", max_rollbacks=2)
    assert [action(cfg, n) for n in range(3)] == ["rollback", "rollback", "skip"]
    assert action(SpikeConfig(policy="skip"), 0) == "skip"


@pytest.mark.parametrize("kw, message", [
    ({"policy": "sometimes"}, "spike.policy: must be one of off, skip, rollback, got 'sometimes'"),
    ({"loss_factor": 0.5}, "spike.loss_factor: must be > 1 (or null), got 0.5"),
    ({"min_history": 60}, "spike.min_history: must be in [1, window=50], got 60"),
    ({"lr_scale": 2.0}, "spike.lr_scale: must be in (0, 1], got 2.0"),
    ({"policy": "skip", "loss_factor": None, "grad_norm_factor": None},
     "spike.policy: skip with neither spike.loss_factor nor spike.grad_norm_factor set detects nothing; "
     "set one of them"),
])
def test_settings_are_checked_naming_the_field(kw, message) -> None:
    with pytest.raises(ConfigError) as e:
        SpikeConfig(**kw)
    assert str(e.value) == message


def test_spike_config_from_the_command_line() -> None:
    from roberta_ds.config_load import load_train_config

    cfg = load_train_config(None, ["model.preset=tiny", "data.max_seq_len=128", "spike.policy=rollback",
                                   "spike.lr_scale=5e-1", "spike.loss_factor=null"])
    assert (cfg.spike.policy, cfg.spike.lr_scale, cfg.spike.loss_factor) == ("rollback", 0.5, None)
    with pytest.raises(ConfigError, match=r"^spike: unknown field\(s\) \['polcy'\]"):
        load_train_config(None, ["spike.polcy=skip"])


def test_spike_fault_grammar() -> None:
    f = Faults("spike@loss:step=3,rank=0; spike=7.5@grad:step=4", rank=0)
    assert f.at("loss", 2) is None
    assert spike_factor(f.at("loss", 3)) == 100.0
    assert spike_factor(f.at("grad", 4)) == 7.5
    assert spike_factor("nan") is None and spike_factor(None) is None
    for bad, message in [("spike@step", "spike happens at loss or grad, not 'step'"),
                         ("spike=-2@loss", "spike=FACTOR needs a number > 0, got '-2'"),
                         ("spike=x@grad", "spike=FACTOR needs a number > 0, got 'x'")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse(bad)


def test_batches_to_skip_stop_at_the_checkpoint() -> None:
    order = DataOrder(0, (2,))  # steps take batches 0, 1, 3, 4, 5, ...
    assert batches_to_skip(order, spike_step=5, checkpoint_step=4, count=1) == [6]
    assert batches_to_skip(order, spike_step=5, checkpoint_step=4, count=3) == [5, 6]
    assert batches_to_skip(order, spike_step=5, checkpoint_step=0, count=3) == [4, 5, 6]


# ----------------------------------------------------------------------------------------------
# Launches


def _steps(job) -> list[tuple[int, int]]:
    """(step, data_batch) of every training record, in the order written (a rollback writes steps again)."""
    return [(r["step"], r["data_batch"]) for r in job.metrics() if "loss" in r]


@pytest.mark.slow
def test_skip_discards_loss_and_grad_spikes_on_every_rank(small_tokenizer, small_shards, tmp_path):
    from ds_scripts.fault_jobs import (
        assert_bitwise_equal_states,
        fault_args,
        launch_job,
        state_tensors,
        tag_dir,
    )

    args = fault_args(small_tokenizer, small_shards, tmp_path / "run",
                      extra=[*SPIKE_SET, "--set", "spike.policy=skip"])
    job = launch_job(args, faults="spike@loss:step=4,rank=0; spike@grad:step=5,rank=1")
    assert job.returncode == 0, job.tail()
    lines = [line for line in job.output.splitlines() if ": loss spike (" in line]
    assert len(lines) == 2, job.tail()
    assert "step 4: loss spike (loss " in lines[0] and "grad norm " in lines[0], lines
    assert lines[0].endswith("update skipped on all ranks (1 in a row, 1 in total)"), lines
    assert "step 5: loss spike (grad norm " in lines[1] and "loss " not in lines[1].split("(")[1], lines
    assert lines[1].endswith("update skipped on all ranks (2 in a row, 2 in total)"), lines
    assert [r["skipped_steps"] for r in job.metrics()] == [0, 0, 0, 0, 1, 2, 2, 2]
    assert _steps(job) == [(s, s - 1) for s in range(1, 9)]  # a skipped step still consumes its batch
    out = job.out_dir
    assert_bitwise_equal_states(tag_dir(out, 4), tag_dir(out, 6))  # both spikes left every tensor as it was
    a, b = state_tensors(tag_dir(out, 6)), state_tensors(tag_dir(out, 8))
    assert any(not a[k].equal(b[k]) for k in a)  # ... and the steps after them did update
    assert job.orphans == []


@pytest.fixture(scope="module")
def rolled_back(tmp_path_factory, small_tokenizer, small_shards):
    from ds_scripts.fault_jobs import fault_args, launch_job

    out = tmp_path_factory.mktemp("spike_rollback") / "run"
    args = fault_args(small_tokenizer, small_shards, out, extra=[
        *SPIKE_SET, "--set", "spike.policy=rollback", "--set", "spike.lr_scale=0.5",
        "--set", "spike.skip_batches=2"])
    job = launch_job(args, faults="spike@loss:step=5,rank=0")
    assert job.returncode == 0, job.tail()
    return job, args


@pytest.mark.slow
def test_rollback_never_consumes_the_spike_batches_again(rolled_back):
    job, _ = rolled_back
    assert "step 5: loss spike (loss " in job.output, job.tail()
    rolled = ("rolled back to step_00000004 (step 4), rollback 1 of at most 5; global batches [4, 5] are never "
              "consumed again (skipped in all: [4, 5]); learning rate x 0.5 from now on")
    assert rolled in job.output, job.tail()
    assert "step_00000004 committed (spike rollback: the skipped batches recorded)" in job.output
    # Steps 1-6 as usual (6 = the spike), back to step 4, then batches 6.. : never 4 or 5 again.
    steps = _steps(job)
    assert steps == [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4), (6, 5), (5, 6), (6, 7), (7, 8), (8, 9)], steps
    event = next(r for r in job.metrics() if "spike_rollback_from" in r)
    assert event == {"step": 4, "spike_rollback_from": 6, "skip_batches": [4, 5], "skipped_batches": [4, 5],
                     "lr_factor": 0.5}
    lrs = {r["step"]: r["lr"] for r in job.metrics() if "loss" in r}  # the last record of each step
    cfg = OptimConfig(lr=1e-3, warmup_steps=2, total_steps=20)  # tiny's lr with the test's schedule
    assert [lrs[s] for s in range(5, 9)] == pytest.approx([0.5 * lr_at(s - 1, cfg) for s in range(5, 9)])
    for step in (4, 6, 8):
        meta = ckpt.read_meta(job.out_dir / "checkpoints" / ckpt.tag_for(step))
        assert meta["data_order"] == {"start_step": 0, "skipped": [4, 5]}, step
        assert (meta["spike"]["rollbacks"], meta["spike"]["lr_factor"]) == (1, 0.5)


@pytest.mark.slow
def test_a_resume_after_the_rollback_skips_the_batches_too(rolled_back, tmp_path):
    from ds_scripts.fault_jobs import copy_run, launch_job

    job, args = rolled_back
    run = copy_run(job.out_dir, tmp_path / "run")
    (run / "metrics.jsonl").unlink()
    args = [a.replace(f"output_dir={job.out_dir}", f"output_dir={run}") for a in args]
    resumed = launch_job([*args, "--resume", str(run / "checkpoints" / ckpt.tag_for(4))])
    assert resumed.returncode == 0, resumed.tail()
    assert f"resumed from {run / 'checkpoints' / ckpt.tag_for(4)} at step 4" in resumed.output
    assert _steps(resumed) == [(5, 6), (6, 7), (7, 8), (8, 9)]
    assert resumed.losses() == {s: job.losses()[s] for s in range(5, 9)}  # bitwise: the same continuation
