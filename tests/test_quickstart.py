"""`roberta-ds quickstart`, the README's first command, end to end (one test: it is the slowest of the suite).

Corpus -> tokenizer -> shards -> 2-rank DeepSpeed training (60 steps here instead of 300) ->
committed checkpoint -> Hugging Face export checked against our logits -> fill-mask. Checked: the
command succeeds, the training and validation losses fall, the export exists and was verified, and
the fill-mask example prints five predictions for each sentence.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from launch import REPO, kill_group

from roberta_ds.quickstart import launcher_env

STEPS = 60
PREDICTION = r"""(?:'[^']*'|"[^"]*") \(\d\.\d\d\)"""  # repr() of the token, then its score


def _command(out: Path) -> list[str]:
    script = Path(sys.executable).parent / "roberta-ds"
    head = [str(script)] if script.is_file() else [sys.executable, "-m", "roberta_ds.cli"]
    return [*head, "quickstart", "--out", str(out), "--steps", str(STEPS)]


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    proc = subprocess.Popen(
        _command(out),
        env=launcher_env(),
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        kill_group(proc.pid)  # the launcher's ranks too, whatever happened
    assert proc.returncode == 0, output[-6000:]

    # Training: the summary line, and the metrics behind it.
    m = re.search(r"^loss (\d+\.\d+) -> (\d+\.\d+) \(", output, re.MULTILINE)
    assert m, output[-4000:]
    first, last = float(m.group(1)), float(m.group(2))
    assert abs(first - math.log(8192)) < 0.5  # the default vocabulary: starts at a uniform guess
    assert last < first - 1.0, f"loss {first} -> {last}"
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == STEPS
    valid = [r["valid_loss"] for r in records if "valid_loss" in r]
    assert len(valid) == 3 and valid[-1] < valid[0]
    assert (out / "run" / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"

    # Export: verified against our model's logits, loadable files in place.
    assert re.search(r"-> .*hf: max abs logit diff vs ours \S+ \(<= ", output), output[-4000:]
    hf = out / "hf"
    assert (hf / "config.json").is_file() and (hf / "tokenizer.json").is_file()
    assert list(hf.glob("*.safetensors")) or list(hf.glob("*.bin"))

    # Fill-mask: each example sentence, then its five predictions with scores.
    tail = output[output.index("=== 6/6") :]
    for sentence in ("Return the <mask> of the list.", "Raise a ValueError if the <mask> is not valid."):
        line = re.search(rf"^{re.escape(sentence)}\n  (.*)$", tail, re.MULTILINE)
        assert line, tail
        assert len(re.findall(PREDICTION, line.group(1))) == 5, line.group(1)
    assert "quickstart finished in" in output
