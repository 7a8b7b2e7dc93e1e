"""The stored learning curve: a fresh run of the golden configuration stays on tests/golden/learning_curve.json.

The run (tests/learning_curve.py): the tiny model on a frozen slice of the built-in corpus, fixed
seeds, 2 CPU ranks through the `deepspeed` launcher, 60 steps; every training loss and the
validation loss and MLM accuracy at steps 15, 30, 45 and 60 must stay within the stored tolerance
(derived from the spread across CPU kernels; see that module). A change that moves the curve fails
here; regenerate the golden file on purpose, in the same commit, with the reason:

    .venv/bin/python tests/learning_curve.py --reason "why the curve moved"
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from learning_curve import CURVE, QUANTITIES, run_curve

pytestmark = pytest.mark.slow


def test_fresh_run_stays_on_the_stored_curve(tmp_path: Path) -> None:
    golden = json.loads(CURVE.read_text())
    curve = run_curve(tmp_path)
    problems = []
    for q in QUANTITIES:
        want, got = golden["curve"][q], curve[q]
        assert [s for s, _ in got] == [s for s, _ in want], f"{q}: logged at other steps than the golden run"
        tol = golden["tolerance"][q]
        worst = max(zip(want, got), key=lambda pair: abs(pair[0][1] - pair[1][1]))
        (step, a), (_, b) = worst
        if abs(a - b) > tol:
            problems.append(f"{q} at step {step}: {b:.7g}, golden {a:.7g} (|diff| {abs(a - b):.3g} > tolerance {tol:.3g})")
    assert not problems, (
        "the learning curve moved:\n  " + "\n  ".join(problems) + "\nIf the change is intended, regenerate "
        "tests/golden/learning_curve.json in the same commit: .venv/bin/python tests/learning_curve.py --reason '...'"
    )
    # The stored curve is one that learns: a regression to a model that does not would not be stored.
    acc = [v for _, v in golden["curve"]["valid_acc"]]
    assert acc[-1] > 2 * acc[0]
