"""The quickstart's end-of-run summary, read from the run's metrics.jsonl.

The loss and accuracy set against the context-free baselines the trainer logged (unigram.py), the
tokens seen, the wall time, where the export is and how to load it:

    the model uses context: validation loss 1.99 nats below the unigram entropy (goal: 1.0), ...
    validation loss  4.4500 nats: 1.99 below the validation tokens' unigram entropy 6.4402 (training tokens: 6.4877)
    MLM accuracy     23.40%: 6.22x the top-1 baseline 3.76% (training tokens: 3.52%)
    ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from roberta_ds.engine.metrics import format_duration
from roberta_ds.errors import UserError

GOAL_NATS = 1.0
"""The quickstart's goal: validation loss at least this far below the validation tokens' unigram entropy."""
GOAL_ACC_RATIO = 2.0
"""... and MLM accuracy at least this many times the top-1 baseline."""


@dataclass(frozen=True)
class RunResult:
    step: int
    valid_loss: float
    valid_acc: float
    valid_entropy: float
    valid_top1: float
    train_entropy: float
    train_top1: float
    tokens_seen: int | None

    @property
    def nats_below(self) -> float:
        return self.valid_entropy - self.valid_loss

    @property
    def acc_ratio(self) -> float:
        return self.valid_acc / self.valid_top1 if self.valid_top1 > 0 else float("inf")

    @property
    def uses_context(self) -> bool:
        return self.nats_below >= GOAL_NATS and self.acc_ratio >= GOAL_ACC_RATIO


def read_result(metrics: Path) -> RunResult:
    """The last evaluation and the last training record of a run's metrics.jsonl."""
    try:
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{metrics}: cannot read the run's metrics ({e})") from None
    evals = [r for r in records if "valid_acc" in r and "valid_unigram_entropy" in r]
    train = [r for r in records if "unigram_entropy" in r]
    if not evals or not train:
        raise UserError(f"{metrics}: no evaluation with baselines was logged; did training run to its end?")
    e, t = evals[-1], train[-1]
    return RunResult(step=e["step"], valid_loss=e["valid_loss"], valid_acc=e["valid_acc"],
                     valid_entropy=e["valid_unigram_entropy"], valid_top1=e["valid_unigram_top1"],
                     train_entropy=t["unigram_entropy"], train_top1=t["unigram_top1"],
                     tokens_seen=t.get("tokens_seen"))


def verdict(r: RunResult) -> str:
    """One line: does the model use context, by the quickstart's two goals?"""
    numbers = (f"validation loss {r.nats_below:.2f} nats below the unigram entropy (goal: {GOAL_NATS:g}), "
               f"MLM accuracy {r.acc_ratio:.2f}x the top-1 baseline (goal: {GOAL_ACC_RATIO:g}x)")
    if r.uses_context:
        return f"the model uses context: {numbers}"
    return f"goal not reached: {numbers}; train longer (--steps) or see the README's quickstart curves"


def summary_lines(r: RunResult, *, steps: int, global_batch: int, seq_len: int, hf_dir: Path,
                  wall_s: float, train_s: float) -> list[str]:
    """The end-of-run summary (see the module docstring)."""
    slots = steps * global_batch * seq_len
    seen = (f"{r.tokens_seen:,} ({100 * r.tokens_seen / slots:.0f}% of {steps:,} steps x {global_batch} "
            f"sequences x {seq_len} positions; the rest is padding)" if r.tokens_seen else "not recorded")
    return [
        verdict(r),
        f"validation loss  {r.valid_loss:.4f} nats: {abs(r.nats_below):.2f} {'below' if r.nats_below >= 0 else 'ABOVE'} "
        f"the validation tokens' unigram entropy {r.valid_entropy:.4f} (training tokens: {r.train_entropy:.4f})",
        f"MLM accuracy     {100 * r.valid_acc:.2f}%: {r.acc_ratio:.2f}x the top-1 baseline "
        f"{100 * r.valid_top1:.2f}% (always the most frequent token; training tokens: {100 * r.train_top1:.2f}%)",
        f"tokens seen      {seen}",
        f"wall time        {format_duration(wall_s)} for this command, {format_duration(train_s)} of it training",
        f"exported model   {hf_dir}",
        f"load it with     AutoModelForMaskedLM.from_pretrained({str(hf_dir)!r})  (from transformers; "
        f"AutoTokenizer likewise)",
    ]
