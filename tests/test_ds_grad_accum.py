"""The one-kernel fp32 gradient accumulation (roberta_ds/engine/ds_grad_accum.py) on DeepSpeed's real
BF16_Optimizer (bf16, ZeRO-1, CPU, gloo, one rank; tests/ds_scripts/grad_accum_check.py in its own
process): the same bits as DeepSpeed's own two-kernel path, through the micro-batch buffers, the
clipped steps and the master weights, with and without `bf16.immediate_grad_update`; one cast per
parameter and micro-batch fewer; refused where DeepSpeed's code is not the one it replaces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def check() -> dict[str, Any]:
    path = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": path}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    script = REPO / "tests" / "ds_scripts" / "grad_accum_check.py"
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fused_accumulation_gives_deepspeeds_bits(check: dict[str, Any]) -> None:
    # The compared numbers are real: gradients in the buffers, weights that moved, a loss that changes.
    assert check["buffers_nonzero"] and check["weights_moved"] and len(set(check["losses"])) > 1
    assert set(check["same_bits"]) == {"fuse=True,immediate=False", "fuse=True,immediate=True",
                                       "fuse=False,immediate=True"}
    for combo, equal in check["same_bits"].items():
        assert equal == {"losses": True, "buffers": True, "master": True, "bf16": True}, combo


def test_one_cast_fewer_per_parameter_and_micro_batch(check: dict[str, Any]) -> None:
    ops, params = check["ops"], check["params"]
    theirs, ours, hooked = ops["deepspeed"], ops["fused"], ops["fused_hooks"]
    assert theirs["_to_copy"] - ours["_to_copy"] == params
    assert theirs["add_"] == ours["add_"]
    # With immediate_grad_update the bf16 gradients are dropped after each parameter's hook instead of
    # zeroed and added into: one multi-tensor zero and one add per parameter fewer on top.
    assert ours["add_"] - hooked["add_"] == params
    assert hooked["_foreach_zero_"] == 0 < ours["_foreach_zero_"]


def test_other_deepspeed_code_is_left_alone(check: dict[str, Any]) -> None:
    assert check["other_version"].startswith("kept: ") and "not the version" in check["other_version"]
    assert check["other_version_bound"] is False
    assert check["other_optimizer"] == "n/a"
