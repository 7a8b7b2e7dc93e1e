"""End-to-end tests of `roberta_ds.train`: the real DeepSpeed engine on 2 CPU ranks (gloo) under a launcher.

Every test launches the trainer through tests/launch.py (deepspeed launcher unless named), on the
tiny preset over the session's small tokenizer and shards. A launch of 2 ranks costs ~10-17 s on
2 cores (imports dominate), so each property is checked with as few launches as possible:

- resume equivalence (fp32/bf16 x ZeRO-1/2/3, accumulation 2, dropout on): ONE straight run of
  2K steps that also commits step K, and ONE run resumed in fresh processes from a copy of its
  output directory rolled back to step K; losses and final fp32 parameters must be bitwise equal;
- world-size changes (and 1 rank x accumulation against 2 ranks) are test_world_size_resume.py's;
- loss falls (torchrun launcher, with validation), NaN on one rank skipped by both, a signal to
  one rank gives one collective checkpoint and exit 75, an indivisible global batch is refused.

Steps: the metrics' `step` is optimizer steps done; fault filters (ROBERTA_DS_FAULTS) use the
0-based index of the step being executed.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from launch import Result, rolled_back_copy, run_trainer, tiny_args

from roberta_ds.checkpoint import commit as ckpt

pytestmark = pytest.mark.slow

FP32 = ["--ds-set", "bf16.enabled=false"]
NO_DROPOUT = ["--set", "model.dropout=0", "--set", "model.attention_dropout=0"]
KEEP_ALL = ["--set", "keep_last=100"]


def _ok(res: Result, code: int = 0) -> Result:
    assert res.returncode == code, (
        f"exit {res.returncode}, expected {code}; last output:\n{res.output[-6000:]}"
    )
    return res


def _tag_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / ckpt.tag_for(step)


def _weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Consolidated fp32 parameters (the master weights) of a committed checkpoint, by our names."""
    from roberta_ds.checkpoint.read_weights import load_weights

    assert (tag_dir / ckpt.META_NAME).is_file(), f"{tag_dir} is not a committed checkpoint"
    return load_weights(tag_dir)


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(a) == sorted(b), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, (
        f"{what}: parameters differ in {differ[:5]} (max |diff| "
        f"{max((a[k] - b[k]).abs().max().item() for k in differ):.3g})"
    )


def _max_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def straight_and_resumed(args, tmp_path: Path, step: int, *, ranks: int, precision: str,
                         stage: int) -> tuple[Result, Result, Path]:
    """A straight run (it commits `step`), and a run resumed in fresh processes from a copy of its
    output directory rolled back to `step`: (straight, resumed, the resumed run's directory).
    `args(out)` gives the trainer arguments for an output directory."""
    straight = _ok(run_trainer(args(tmp_path / "straight"), ranks=ranks, timeout=300))
    assert f"x world {ranks}; {precision}, ZeRO-{stage}" in straight.output
    resumed_dir = rolled_back_copy(straight.out_dir, tmp_path / "resumed", step)
    resumed = _ok(run_trainer(args(resumed_dir), ranks=ranks, timeout=300))
    assert f"resumed from {_tag_dir(resumed_dir, step)} at step {step}" in resumed.output
    return straight, resumed, resumed_dir


# ----------------------------------------------------------------------------------------------
# Resume equivalence


K = 2  # the straight run commits step K and ends at 2K


@pytest.mark.parametrize("stage", [1, 2, 3], ids=lambda s: f"zero{s}")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bitwise_equal_to_straight_run(
    small_tokenizer: Path, small_shards: Path, tmp_path: Path, precision: str, stage: int
) -> None:
    """2K steps straight == K steps, stop, resume in fresh processes, K more (dropout 0.1 on)."""
    extra = KEEP_ALL + ["--set", f"save_interval={K}"] + (FP32 if precision == "fp32" else [])

    def args(out: Path) -> list[str]:
        # global 8 = micro 2 x accumulation 2 x 2 ranks
        return tiny_args(
            small_tokenizer,
            small_shards,
            out,
            steps=2 * K,
            ds_config=f"zero{stage}_bf16",
            global_batch=8,
            micro=2,
            extra=extra,
        )

    straight, resumed, resumed_dir = straight_and_resumed(args, tmp_path, K, ranks=2, precision=precision,
                                                          stage=stage)

    a, b = straight.metrics(), resumed.metrics()
    assert [r["step"] for r in a] == list(range(1, 2 * K + 1))
    assert [r["step"] for r in b] == list(range(1, 2 * K + 1)), (
        "the resumed run must append steps K+1..2K once"
    )
    for ra, rb in zip(a[K:], b[K:]):
        # Bitwise: float equality of the logged means (same dropout masks, same data, same states).
        assert (rb["loss"], rb["grad_norm"], rb["lr"], rb["samples_consumed"]) == (
            ra["loss"],
            ra["grad_norm"],
            ra["lr"],
            ra["samples_consumed"],
        ), f"step {ra['step']}"
    assert a[K]["loss"] != a[K + 1]["loss"]  # the compared numbers are not constant

    final_a, final_b = _weights(_tag_dir(straight.out_dir, 2 * K)), _weights(_tag_dir(resumed_dir, 2 * K))
    _assert_bitwise_equal(final_a, final_b, f"{precision} ZeRO-{stage}: final parameters after resume")
    assert _max_change(final_a, _weights(_tag_dir(straight.out_dir, K))) > 1e-5  # steps K+1..2K did update


# ----------------------------------------------------------------------------------------------
# Training behaviour


def test_loss_falls_under_torchrun(small_tokenizer: Path, small_shards: Path, tmp_path: Path) -> None:
    """30 steps on the built-in corpus through `torchrun -m roberta_ds.train`: train and valid loss fall."""
    steps = 30
    args = tiny_args(
        small_tokenizer,
        small_shards,
        tmp_path / "run",
        steps=steps,
        valid=True,
        extra=["--set", "optim.lr=2e-3", "--set", "optim.warmup_steps=3", "--set", "eval_interval=15"],
    )
    res = _ok(run_trainer(args, ranks=2, launcher="torchrun", timeout=240))
    assert "from torchrun" in res.output
    metrics = res.metrics()
    losses = [r["loss"] for r in metrics if "loss" in r]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(2048)) < 0.3  # starts near ln(vocab): a uniform guess
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.4, f"loss did not fall: first 5 mean {first:.3f}, last 5 mean {last:.3f}"
    valid = [(r["step"], r["valid_loss"]) for r in metrics if "valid_loss" in r]
    assert [s for s, _ in valid] == [15, 30]
    assert valid[1][1] < valid[0][1]
    assert [r["samples_consumed"] for r in metrics] == [8 * s for s in range(1, steps + 1)]


def test_nan_on_one_rank_is_skipped_by_both(
    small_tokenizer: Path, small_shards: Path, tmp_path: Path
) -> None:
    """A NaN loss on rank 1 at step index 1: no rank applies that update; training goes on."""
    args = tiny_args(
        small_tokenizer,
        small_shards,
        tmp_path / "run",
        steps=3,
        extra=KEEP_ALL + ["--set", "save_interval=1"],
    )
    res = _ok(run_trainer(args, ranks=2, env={"ROBERTA_DS_FAULTS": "nan@loss:step=1,rank=1"}, timeout=240))
    assert "[fault] rank 1: nan at loss step 1" in res.output
    assert "[fault] rank 0" not in res.output
    assert "step 1: non-finite loss or gradients on some rank; update skipped on all ranks" in res.output
    by_step = {r["step"]: r for r in res.metrics()}
    assert [by_step[s]["skipped_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    assert math.isnan(by_step[2]["loss"]) and math.isfinite(by_step[3]["loss"])
    assert ckpt.read_meta(_tag_dir(res.out_dir, 3))["skipped_steps"] == 1
    # ZeRO-2: each rank owns half of the fp32 master weights; the consolidated weights come from both.
    before, after, then = (_weights(_tag_dir(res.out_dir, s)) for s in (1, 2, 3))
    _assert_bitwise_equal(before, after, "the skipped step changed parameters")
    assert all(torch.isfinite(t).all() for t in then.values())
    assert _max_change(then, after) > 1e-5  # the next step applied normally


def test_signal_to_one_rank_saves_once_and_requeues(
    small_tokenizer: Path, small_shards: Path, tmp_path: Path
) -> None:
    """SIGTERM to rank 1 during step index 1: both ranks finish the step, commit ONE checkpoint, exit 75."""
    from roberta_ds.engine.trainer import REQUEUE_EXIT_CODE

    args = tiny_args(
        small_tokenizer, small_shards, tmp_path / "run", steps=8, extra=["--set", "save_interval=1000"]
    )
    res = _ok(
        run_trainer(args, ranks=2, env={"ROBERTA_DS_FAULTS": "sigterm@step:step=1,rank=1"}, timeout=240),
        REQUEUE_EXIT_CODE,
    )
    assert "[fault] rank 1: sigterm at step step 1" in res.output
    assert (
        "stopped by SIGTERM at step 2" in res.output
        or "stopped by a signal on another rank at step 2" in res.output
    )
    ckpt_dir = res.out_dir / "checkpoints"
    assert [c.tag for c in ckpt.committed(ckpt_dir)] == [ckpt.tag_for(2)]
    assert ckpt.read_pointer(ckpt_dir) == ckpt.tag_for(2)
    assert not [
        d.name for d in ckpt_dir.iterdir() if d.name.startswith((ckpt.STAGING_PREFIX, ckpt.TRASH_PREFIX))
    ]
    meta = ckpt.read_meta(_tag_dir(res.out_dir, 2))
    assert meta["step"] == 2 and meta["samples_consumed"] == 16
    # Collective: both ranks' RNG and optimizer partitions are in it, and it verifies.
    assert {ckpt.rng_file(0), ckpt.rng_file(1)} <= set(meta["files"])
    assert sum("optim_states" in name for name in meta["files"]) == 2
    ckpt.verify_files(_tag_dir(res.out_dir, 2), meta, shard=lambda i: True)
    assert [r["step"] for r in res.metrics()] == [1, 2]


def test_indivisible_global_batch_is_refused_before_training(
    small_tokenizer: Path, small_shards: Path, tmp_path: Path
) -> None:
    args = tiny_args(small_tokenizer, small_shards, tmp_path / "run", steps=2, global_batch=6, micro=2)
    res = run_trainer(args, ranks=2, timeout=240)
    assert res.returncode == 1, res.output[-4000:]
    assert (
        "train_batch_size 6 is not divisible by train_micro_batch_size_per_gpu 2 x world size 2 = 4 "
        "(6 / 4 = 1.500 accumulation steps)"
    ) in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "run").exists()  # nothing written: refused before any training or checkpoint


def test_unknown_compile_option_is_refused_naming_it(
    small_tokenizer: Path, small_shards: Path, tmp_path: Path
) -> None:
    extra = ["--set", "compile=true", "--set", "compile_options.coordinate_descent_tunning=true"]
    args = tiny_args(small_tokenizer, small_shards, tmp_path / "run", steps=2, extra=extra)
    res = run_trainer(args, ranks=1, timeout=240)
    assert res.returncode == 1, res.output[-4000:]
    assert ("compile_options: Unexpected optimization option coordinate_descent_tunning; the names are "
            "torch._inductor.config's") in res.output
    assert "known options are" not in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------------------------------------
# Padding-free layers


def test_unpadded_model_trains_and_validates_like_the_padded_one(
    small_tokenizer: Path, small_shards: Path, tmp_path: Path
) -> None:
    """`model.unpad` (varlen attention, layers on real tokens only, the loader's unpad_index) against
    the default key-mask model: fp32, dropout 0, 4 steps with validation, the same losses and weights
    up to summation order. The batches hold padding (tokens < samples x seq), so the paths differ."""
    def args(out: Path, extra: list[str]) -> list[str]:
        more = ["--set", "eval_interval=2", "--set", "save_interval=2", *extra]
        return tiny_args(small_tokenizer, small_shards, out, steps=4, global_batch=4, valid=True,
                         extra=FP32 + NO_DROPOUT + KEEP_ALL + more)

    ref = _ok(run_trainer(args(tmp_path / "ref", []), ranks=1, timeout=240))
    unpad = _ok(run_trainer(args(tmp_path / "unpad", ["--set", "model.attention_kernel=varlen",
                                                      "--set", "model.unpad=true"]), ranks=1, timeout=240))
    assert "attention varlen, padding-free layers" in unpad.output and "attention sdpa\n" in ref.output
    rm, um = ref.metrics(), unpad.metrics()
    per_sample = [r["tokens_per_s"] / r["samples_per_s"] for r in rm if "loss" in r]
    assert min(per_sample) < 60, f"{per_sample}: rows barely padded, the test could not tell"
    for key in ("loss", "valid_loss"):
        a, b = [r[key] for r in rm if key in r], [r[key] for r in um if key in r]
        assert len(a) == len(b) == (4 if key == "loss" else 2)
        assert b == pytest.approx(a, rel=1e-5), key
    a, b = _weights(_tag_dir(unpad.out_dir, 4)), _weights(_tag_dir(ref.out_dir, 4))
    assert sorted(a) == sorted(b)
    for k, t in a.items():  # summation order differs (fewer rows): rounding, far below a step's change
        torch.testing.assert_close(t, b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert _max_change(b, _weights(_tag_dir(ref.out_dir, 2))) > 1e-4
