"""Fault injection, data: shards that vanish or shrink mid-run, out-of-vocabulary ids, another tokenizer.

Guarantee 9:
- shards deleted while the run reads them (2 ranks, a DataLoader worker each: the error comes out
  of a worker) -> the job ends non-zero, the message names the file, nothing is left running;
- shards truncated while the run reads them (1 rank, reads in the main process) -> the same;
- a shard holding a token id >= the model's vocabulary -> refused at start (before any step or
  file is written), naming the file and the id;
- resuming with a data directory (and its tokenizer) other than the checkpoint's -> refused at
  resume, naming the checkpoint and both tokenizer fingerprints.
The shard sets are copies of the session's; the faults (`unlink=` / `truncate=`) fire at the start
of step index 2 on rank 0, and every .bin of the set is hit so whichever the next batch reads fails.

Cost: 4 launches.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from ds_scripts.fault_jobs import copy_run, fault_args, launch_job, reference_run

from roberta_ds.checkpoint import commit as ckpt
from roberta_ds.data.shard_set import read_manifest

pytestmark = pytest.mark.slow


def _copy_shards(small_shards: Path, dst: Path) -> Path:
    shutil.copytree(small_shards / "train", dst / "train")
    return dst


def _bins(shards: Path) -> list[Path]:
    return sorted((shards / "train").glob("*.bin"))


def _every_bin(action: str, shards: Path) -> str:
    return "; ".join(f"{action}={p}@step:step=2,rank=0" for p in _bins(shards))


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_shard_changed_mid_run_is_named(small_tokenizer, small_shards, tmp_path, how):
    shards = _copy_shards(small_shards, tmp_path / "shards")
    bins = _bins(shards)
    if how == "deleted":  # 2 ranks; the reads happen in a DataLoader worker
        args = fault_args(small_tokenizer, shards, tmp_path / "run", extra=["--set", "data.num_workers=1"])
        job = launch_job(args, faults=_every_bin("unlink", shards))
        expect = "deleted or renamed while the data pipeline had it open"
    else:  # 1 rank; the reads happen in the training process itself
        args = fault_args(small_tokenizer, shards, tmp_path / "run")
        job = launch_job(args, ranks=1, faults=_every_bin("truncate", shards))
        expect = "truncated or resized"
    assert job.returncode not in (None, 0), job.tail()
    line = next((x for x in job.output.splitlines() if expect in x), "")
    assert line.startswith("[roberta-ds] rank ") and ": error: " in line, job.tail()
    assert any(f"{p}: " in line for p in bins), line  # the file is named
    assert job.orphans == [], job.orphans


def test_token_id_beyond_vocabulary_is_refused_at_start(small_tokenizer, small_shards, tmp_path):
    shards = _copy_shards(small_shards, tmp_path / "shards")
    bad = _bins(shards)[1]
    dtype = np.dtype(read_manifest(shards / "train").dtype)
    tokens = np.memmap(bad, dtype=dtype, mode="r+")
    tokens[len(tokens) // 2] = 4000  # the tokenizer (and the model) have 2,048 ids
    tokens.flush()
    del tokens
    out = tmp_path / "run"
    job = launch_job(fault_args(small_tokenizer, shards, out))
    assert job.returncode == 1, job.tail()
    assert f"{bad}: holds token id 4000, but the model's vocabulary has 2048 ids" in job.output, job.tail()
    assert "Traceback" not in job.output
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_data_of_another_tokenizer_is_refused_at_resume(builtin_corpus, small_tokenizer, small_shards,
                                                         tmp_path_factory, tmp_path):
    from data_tools.build_shards import build_shards
    from data_tools.train_tokenizer import train_tokenizer

    reference = reference_run(tmp_path_factory, small_tokenizer, small_shards)
    run = copy_run(reference.out_dir, tmp_path / "run")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    other_tok, other_shards = tmp_path / "tok1024", tmp_path / "shards1024"
    train_tokenizer([builtin_corpus], other_tok, vocab_size=1024)
    build_shards([builtin_corpus], other_tok, other_shards, workers=1, valid_fraction=0.0,
                 shard_tokens=400_000)
    job = launch_job(fault_args(other_tok, other_shards, run))  # a consistent pair, but not the checkpoint's
    assert job.returncode == 1, job.tail()
    newest = run / "checkpoints" / ckpt.tag_for(8)
    assert f"{newest}: trained with tokenizer sha256 " in job.output, job.tail()
    assert "but this run's tokenizer (and data manifest) has" in job.output
    assert "Traceback" not in job.output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing changed on disk
