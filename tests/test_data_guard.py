"""The resume guard on the data (data_order.py): a checkpoint records what fixes its sample order; a
resume that would move it is refused, naming each setting with both values, unless
--allow-data-change, which restarts the new order at the saved step (logged once); settings that
cannot move the order pass without a word.

Units: DataOrder's step -> batch map, the identity comparison (by shard content, not by path),
a manifest from before the identity. Launches (one rank, the tiny model), chained on one run
directory: 2 steps; a resume with data.seed and data.max_seq_len changed (refused); one with
num_workers and log_interval changed (continues, silent); one with data.seed changed and
--allow-data-change (order restarts at step 4); a plain resume of that (silent, continues the new
order). The batch each step took is the `data_batch` the loader delivered (metrics.jsonl).

Cost: 5 short one-rank launches, 80 s on the shared 2-core machine (under load).
"""

from __future__ import annotations

import pytest

from roberta_ds.checkpoint import commit as ckpt
from roberta_ds.config import DataConfig, DataSource
from roberta_ds.data.order import (
    DataOrder,
    check_data_unchanged,
    data_identity,
    identity_changes,
    legacy_identity,
    resumed_order,
)
from roberta_ds.data.shard_set import read_manifest
from roberta_ds.errors import CheckpointError

# ----------------------------------------------------------------------------------------------
# Units


def test_order_maps_steps_to_batches() -> None:
    assert [DataOrder().batch_at(s) for s in range(4)] == [0, 1, 2, 3]
    order = DataOrder(start_step=4, skipped=(1, 2, 5))
    assert [order.batch_at(s) for s in range(4, 10)] == [0, 3, 4, 6, 7, 8]
    assert order.skipping([0, 5]).skipped == (0, 1, 2, 5)
    assert DataOrder.from_json(order.to_json()) == order and DataOrder.from_json(None) == DataOrder()
    with pytest.raises(ValueError, match="precedes the order's start at step 4"):
        order.batch_at(3)
    with pytest.raises(ValueError, match="sorted and unique"):
        DataOrder(0, (3, 1))


def test_identity_compares_sets_by_content_and_names_each_change(small_shards, tmp_path) -> None:
    import shutil

    train = small_shards / "train"
    moved = shutil.copytree(train, tmp_path / "moved")
    manifest = read_manifest(str(train))
    cfg = DataConfig(train=(DataSource(str(train)),), max_seq_len=64)
    saved = data_identity(cfg, [manifest])
    same = data_identity(DataConfig(train=(DataSource(str(moved)),), max_seq_len=64, num_workers=7,
                                    mask_prob=0.2), [read_manifest(str(moved))])
    assert identity_changes(saved, same) == []  # a moved directory, workers, masking: the same order
    other = data_identity(DataConfig(train=(DataSource(str(train), 2.0),), max_seq_len=32, seed=3,
                                     packing="doc-sentences"), [manifest])
    changes = identity_changes(saved, other)
    fp = saved["data.train"][0]["shards"]
    assert changes == [
        f"data.train: checkpoint [{train} (weight 1, shards {fp})], now [{train} (weight 2, shards {fp})]",
        "data.max_seq_len: checkpoint 64, now 32",
        "data.packing: checkpoint 'full-sentences', now 'doc-sentences'",
        "data.seed: checkpoint 1, now 3",
    ]
    meta = {"step": 8, "data_identity": saved}
    check_data_unchanged(meta, same, allow=False, where="ckpt")
    with pytest.raises(CheckpointError) as e:
        check_data_unchanged(meta, other, allow=False, where="ckpt")
    assert str(e.value).startswith("ckpt: the data changed since this checkpoint")
    assert changes[3] in str(e.value)
    assert str(e.value).endswith("pass --allow-data-change to continue from step 8 on the new order, which "
                                 "then starts at its first batch")
    check_data_unchanged(meta, other, allow=True, where="ckpt")
    order, note = resumed_order({**meta, "data_order": {"start_step": 0, "skipped": [3]}}, other)
    assert order == DataOrder(start_step=8)
    assert note.startswith("--allow-data-change: the data changed (data.train: ") and note.endswith(
        "the sample order restarts at step 8, which takes batch 0 of the new order; the 1 batch(es) skipped "
        "under the old order no longer apply")
    kept = resumed_order({**meta, "data_order": {"start_step": 2, "skipped": [3]}}, same)
    assert kept == (DataOrder(2, (3,)), None)


def test_a_manifest_from_before_the_identity_is_compared_by_path() -> None:
    meta = {"step": 2, "data": {"train": [{"path": "a", "weight": 1.0}], "max_seq_len": 64, "packing":
                                "full-sentences", "seed": 1, "num_workers": 2}}
    legacy = legacy_identity(meta)
    now = {"data.train": [{"path": "a", "weight": 1.0, "shards": "0123"}], "data.max_seq_len": 64,
           "data.packing": "full-sentences", "data.seed": 1}
    assert identity_changes(legacy, now) == []
    now["data.train"][0]["path"] = "b"
    assert identity_changes(legacy, now) == [
        "data.train: checkpoint [a (weight 1)], now [b (weight 1, shards 0123)]"]


def test_a_legacy_run_moved_with_its_data_is_the_same_data() -> None:
    """A run directory copied together with the shards beside it keeps its data (tests/golden's case);
    a set moved on its own, or one that was never beside the run, is still a change."""
    meta = {"step": 2, "config": {"output_dir": "/old/exp/run"},
            "data": {"train": [{"path": "/old/exp/shards/train", "weight": 1.0}]}}
    now = {"data.train": [{"path": "/new/place/exp/shards/train", "weight": 1.0, "shards": "0123"}]}
    assert identity_changes(legacy_identity(meta, "/new/place/exp/run"), now) == []
    stayed = {"data.train": [{"path": "/old/exp/shards/train", "weight": 1.0, "shards": "0123"}]}
    assert identity_changes(legacy_identity(meta, "/new/place/exp/run"), stayed) == []  # run moved alone
    assert identity_changes(legacy_identity(meta), now) != []  # no run dir given: by path as stored
    assert identity_changes(legacy_identity(meta, "/new/place/other/run"), now) != []
    far = {**meta, "data": {"train": [{"path": "/data/train", "weight": 1.0}]}}
    assert legacy_identity(far, "/new/run")["data.train"] == [{"path": "/data/train", "weight": 1.0}]


# ----------------------------------------------------------------------------------------------
# Launches


def _batches(res) -> dict[int, int]:
    return {r["step"]: r["data_batch"] for r in res.metrics() if "loss" in r}


@pytest.mark.slow
def test_resume_guard_refuses_allows_and_ignores(small_tokenizer, small_shards, tmp_path):
    from launch import run_trainer, tiny_args

    out = tmp_path / "run"

    def launch(steps: int, *extra: str):
        args = tiny_args(small_tokenizer, small_shards, out, steps=steps,
                         extra=["--set", "save_interval=2", *extra])
        return run_trainer(args, ranks=1, launcher="python", timeout=240)

    first = launch(2)
    assert first.returncode == 0, first.output[-3000:]
    refused = launch(4, "--set", "data.seed=2", "--set", "data.max_seq_len=32")
    assert refused.returncode != 0
    assert "the data changed since this checkpoint" in refused.output, refused.output[-3000:]
    for text in ("data.max_seq_len: checkpoint 64, now 32", "data.seed: checkpoint 1, now 2",
                 "pass --allow-data-change to continue from step 2"):
        assert text in refused.output, text
    assert "Traceback" not in refused.output
    assert [c.step for c in ckpt.committed(out / "checkpoints")] == [2]

    harmless = launch(4, "--set", "data.num_workers=1", "--set", "log_interval=1",
                      "--set", "data.mask_prob=0.2")
    assert harmless.returncode == 0, harmless.output[-3000:]
    assert "data changed" not in harmless.output and "resumed from" in harmless.output
    assert _batches(harmless) == {1: 0, 2: 1, 3: 2, 4: 3}

    allowed = launch(6, "--set", "data.seed=2", "--allow-data-change")
    assert allowed.returncode == 0, allowed.output[-3000:]
    note = ("--allow-data-change: the data changed (data.seed: checkpoint 1, now 2); the sample order "
            "restarts at step 4")
    assert allowed.output.count(note) == 1, allowed.output[-3000:]
    assert _batches(allowed)[5] == 0 and _batches(allowed)[6] == 1
    meta = ckpt.read_meta(out / "checkpoints" / ckpt.tag_for(6))
    assert meta["data_order"] == {"start_step": 4, "skipped": []} and meta["data_identity"]["data.seed"] == 2

    later = launch(8, "--set", "data.seed=2")  # the new order is the checkpoint's now: no flag, no word
    assert later.returncode == 0, later.output[-3000:]
    assert "data changed" not in later.output
    assert _batches(later)[7] == 2 and _batches(later)[8] == 3
