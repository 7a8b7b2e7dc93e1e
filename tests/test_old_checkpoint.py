"""A checkpoint written by older code still resumes and exports (tests/golden/old_checkpoint/).

The golden folder was made by tests/old_checkpoint.py at the commit named in its MADE_AT file
(before roberta_ds/ was split into subpackages): 2 steps of the tiny model on 2 ranks, ZeRO-2
bf16. Here the current code resumes it for one more step on 2 CPU ranks (the real `deepspeed`
launcher, gloo) and exports it to Hugging Face format, checked by loading it with transformers.
One launch, shared by the assertions through a module fixture.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from launch import run_trainer  # noqa: E402
from old_checkpoint import GOLDEN, STEPS, train_args  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def old_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the golden folder (resuming writes new checkpoints beside the old one)."""
    out = tmp_path_factory.mktemp("old") / "old_checkpoint"
    shutil.copytree(GOLDEN, out)
    return out


@pytest.fixture(scope="module")
def resumed(old_copy: Path):
    res = run_trainer(train_args(old_copy, old_copy / "run", STEPS + 1), ranks=2)
    assert res.returncode == 0, res.output[-4000:]
    return res


def test_golden_is_small_and_names_its_commit() -> None:
    size = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    assert size < 3 << 20, f"{GOLDEN}: {size} bytes; keep the golden checkpoint under 3 MB"
    assert len((GOLDEN / "MADE_AT").read_text().strip()) >= 7


def test_old_checkpoint_resumes_for_one_step(resumed) -> None:
    steps = sorted(resumed.losses())
    assert steps == [STEPS + 1], f"expected only step {STEPS + 1} after resuming at {STEPS}: {steps}"
    assert "resumed" in resumed.output.lower()
    latest = (resumed.out_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.endswith(str(STEPS + 1)), latest


def test_old_checkpoint_exports_to_hf(old_copy: Path, tmp_path: Path) -> None:
    from roberta_ds import cli

    out = tmp_path / "hf"
    rc = cli.main(["export-hf", "--checkpoint", str(GOLDEN / "run" / "checkpoints"), "--tag", _golden_tag(),
                   "--tokenizer", str(old_copy / "tokenizer"), "--out", str(out)])
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "roberta" and config["num_hidden_layers"] == 2, config
    assert (out / "model.safetensors").stat().st_size > 0


def _golden_tag() -> str:
    return (GOLDEN / "run" / "checkpoints" / "latest").read_text().strip()
