"""Fault injection, hostile files: pickles that run code when loaded must be refused by every loader of ours.

Guarantee 8. The payload is a real one (its `__reduce__` calls `os.system("touch <marker>")`); each
test first proves it works by loading it the unsafe way, then checks that the marker never
appears when our code meets it:
- resume (trainer): a DeepSpeed model-states file carrying the payload as client state, (a) with
  the manifest untouched (sha256 mismatch) and (b) with the manifest rewritten to match it (the
  pickle scan, `checkpoint.check_pickle_safe`, refuses it and names the global); an extra,
  unlisted `.pt` file is refused too; --resume-fallback skips to the previous checkpoint;
- resume through a universal conversion: a tampered file in a reused `<tag>_universal` makes it
  be converted again from the verified checkpoint;
- export-hf (`ds_checkpoint.inspect_layout`) and import-hf / init_from (`weights_io.read_weights`);
- the Hugging Face export of a clean checkpoint holds no pickle at all (safetensors + JSON + text).
DeepSpeed's own loader (`engine.load_checkpoint`, `torch.load(weights_only=False)`) is for
trusted checkpoints only; the trainer calls it only on what passed the checks above.

All in-process, on copies of the shared reference run's checkpoints: no launch of its own.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from ds_scripts.fault_jobs import copy_run, plan_here, reference_run, tag_dir

from roberta_ds.checkpoint import commit as ckpt
from roberta_ds.durable import _safe_globals, file_sha256
from roberta_ds.errors import CheckpointError, UserError

pytestmark = pytest.mark.slow  # the shared reference run is a launch

MODEL_STATES = "mp_rank_00_model_states.pt"


class RunsCode:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_tokenizer, small_shards):
    return reference_run(tmp_path_factory, small_tokenizer, small_shards)


def _poison_model_states(path: Path, marker: Path) -> None:
    """Rewrite a real model-states file with the payload added as client state (as torch.save would)."""
    with torch.serialization.safe_globals(_safe_globals()):
        state = torch.load(path, map_location="cpu", weights_only=True)
    state["my_client_state"] = {"note": RunsCode(marker)}
    torch.save(state, path)
    # The payload is live: loading it the unsafe way runs it.
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.exists(), "the test payload does not run; the checks below would prove nothing"
    marker.unlink()


def _rewrite_manifest(tag: Path, name: str) -> None:
    meta = json.loads((tag / ckpt.META_NAME).read_text())
    meta["files"][name] = {"bytes": (tag / name).stat().st_size, "sha256": file_sha256(tag / name)}
    (tag / ckpt.META_NAME).write_text(json.dumps(meta))


@pytest.mark.parametrize("manifest", ["untouched", "rewritten"])
def test_resume_refuses_code_running_pickle(reference, tmp_path, manifest):
    run = copy_run(reference.out_dir, tmp_path / "run")
    marker = tmp_path / "PWNED"
    victim = tag_dir(run, 8) / MODEL_STATES
    _poison_model_states(victim, marker)
    if manifest == "rewritten":
        _rewrite_manifest(tag_dir(run, 8), MODEL_STATES)
        expect = f"{victim}: refused to load: it references ['posix.system']"
    else:  # it grew: the size check names it before any hashing
        expect = f"{victim}: {victim.stat().st_size} bytes, manifest says"
    with pytest.raises(CheckpointError) as err:
        plan_here(run, fallback=False)
    assert expect in str(err.value)
    assert not marker.exists()
    point = plan_here(run, fallback=True)
    assert point.chosen.tag == "step_00000006"
    assert not marker.exists()


def test_resume_refuses_unlisted_pickle(reference, tmp_path):
    run = copy_run(reference.out_dir, tmp_path / "run")
    marker = tmp_path / "PWNED"
    extra = tag_dir(run, 8) / "zero_pp_rank_2_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": RunsCode(marker)}, extra)
    with pytest.raises(CheckpointError, match=f"{extra}: not listed in"):
        plan_here(run, fallback=False)
    assert not marker.exists()


def test_tampered_universal_conversion_is_converted_again(reference, tmp_path):
    run = copy_run(reference.out_dir, tmp_path / "run")
    marker = tmp_path / "PWNED"
    first = plan_here(run, fallback=False)  # 1 process vs 2 that wrote it: converted, with a manifest
    assert first.universal
    universal = first.load_dir / first.load_tag
    victim = min(universal.rglob("fp32.pt"))
    torch.save({"param": RunsCode(marker)}, victim)
    logs: list[str] = []
    again = plan_here(run, fallback=False, log=logs)
    refused = f"{universal.name}: refused ({victim}: "
    assert any(refused in line and "converting again" in line for line in logs), logs
    assert not marker.exists()
    meta = json.loads((again.load_dir / again.load_tag / ckpt.META_NAME).read_text())
    ckpt.verify_files(again.load_dir / again.load_tag, meta, shard=lambda i: True)  # clean again


def test_export_and_import_refuse_code_running_pickles(reference, small_tokenizer, tmp_path):
    from roberta_ds.hf.convert import export_main
    from roberta_ds.hf.weights import read_weights

    run = copy_run(reference.out_dir, tmp_path / "run")
    marker = tmp_path / "PWNED"
    _poison_model_states(tag_dir(run, 8) / MODEL_STATES, marker)
    _rewrite_manifest(tag_dir(run, 8), MODEL_STATES)  # so that only the pickle scan can stop it
    with pytest.raises(UserError, match="refused to load"):
        export_main(["--checkpoint", str(run / "checkpoints"), "--tokenizer", str(small_tokenizer),
                     "--out", str(tmp_path / "hf")])
    assert not marker.exists() and not (tmp_path / "hf").exists()

    weights = tmp_path / "pytorch_model.bin"
    with open(weights, "wb") as f:
        pickle.dump({"embeddings.word.weight": RunsCode(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused"):
        read_weights(weights)
    assert not marker.exists()


def test_hf_export_holds_no_pickle(reference, small_tokenizer, tmp_path):
    from roberta_ds.hf.convert import export_main

    out = tmp_path / "hf"
    export_main(["--checkpoint", str(reference.out_dir / "checkpoints"), "--tokenizer", str(small_tokenizer),
                 "--out", str(out)])
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert "model.safetensors" in {p.name for p in files}
    for p in files:
        assert p.suffix not in (".bin", ".pt", ".pth", ".pkl", ".ckpt"), p
        head = p.read_bytes()[:4]
        pickled = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
        assert not pickled, f"{p} is a pickle"
        assert head[:2] != b"PK", f"{p} is a zip archive (torch.save format)"
