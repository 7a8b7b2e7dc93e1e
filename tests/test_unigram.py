"""Context-free baselines (roberta_ds/data/unigram.py): the numbers, the manifest field and its compatibility.

Checked: the entropy and top-1 share are the exact optimum of a constant predictor on the counted
tokens, special ids excluded; every tool that writes a manifest stores them and `verify` recounts
them; a manifest written before the field (or by another tool) still loads and is counted on the
fly, to the same numbers; a bad field is refused naming the file and the field; several sets combine
by union or by mixture; the trainer's helper gives the same numbers on one process.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_tools.merge_shards import merge_shard_sets
from roberta_ds.data.shard_set import Manifest, read_manifest, verify_set, write_manifest
from roberta_ds.data.shards import ShardFormatError
from roberta_ds.data.unigram import FIELD, UnigramStats, count_tokens, group_stats, stored_stats

SPECIALS = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}


def one_process(counts: np.ndarray) -> np.ndarray:
    return counts


def test_stats_are_the_best_constant_predictor() -> None:
    counts = np.array([50, 9, 50, 0, 7, 10, 30, 0, 60], dtype=np.int64)  # ids 0-4 special
    s = UnigramStats.from_counts(counts, SPECIALS)
    p = np.array([10, 30, 60]) / 100
    assert s.maskable_tokens == 100 and s.top1_id == 8 and s.top1 == 0.6
    assert s.entropy == round(float(-(p * np.log(p)).sum()), 6)
    # The mean loss of any constant distribution q over these tokens is H(p) + KL(p || q) >= H(p).
    rng = np.random.default_rng(0)
    for _ in range(100):
        q = rng.dirichlet(np.ones(3))
        assert float(-(p * np.log(q)).sum()) >= s.entropy - 1e-6
    assert UnigramStats.from_counts(np.zeros(9), SPECIALS) == UnigramStats(0, 0.0, 0.0, -1)


def test_built_sets_store_stats_that_verify_recounts(small_shards: Path) -> None:
    for split in ("train", "valid"):
        d = small_shards / split
        m = read_manifest(d)
        counts = count_tokens(d, m)
        assert counts.sum() == m.tokens
        assert stored_stats(d, m) == UnigramStats.from_counts(counts, m.special_ids)
        assert 0 < m.token_stats["entropy"] < math.log(m.vocab_size)
        verify_set(d)


def _copy_with(small_shards: Path, tmp_path: Path, edit) -> Path:
    d = tmp_path / "set"
    shutil.copytree(small_shards / "valid", d)
    raw = json.loads((d / "manifest.json").read_text())
    edit(raw)
    (d / "manifest.json").write_text(json.dumps(raw))
    return d


def test_verify_refuses_stats_that_do_not_match_the_tokens(small_shards: Path, tmp_path: Path) -> None:
    d = _copy_with(small_shards, tmp_path, lambda raw: raw[FIELD].update(entropy=raw[FIELD]["entropy"] + 0.01))
    read_manifest(d)  # well formed: only a recount can tell
    with pytest.raises(ShardFormatError, match=rf"manifest.json: field '{FIELD}' says .* the shards give"):
        verify_set(d)


@pytest.mark.parametrize("value, message", [
    ("high", "must be an object"),
    ({"entropy": 6.0}, r"lacks \['maskable_tokens', 'top1', 'top1_id'\]"),
    ({"maskable_tokens": 5, "entropy": 1.0, "top1": 1.5, "top1_id": 7}, "impossible values"),
    ({"maskable_tokens": "many", "entropy": 1.0, "top1": 0.5, "top1_id": 7}, "malformed"),
])
def test_malformed_stats_are_refused_naming_the_field(small_shards: Path, tmp_path: Path, value, message) -> None:
    d = _copy_with(small_shards, tmp_path, lambda raw: raw.update({FIELD: value}))
    with pytest.raises(ShardFormatError, match=rf"{d / 'manifest.json'}: field '{FIELD}' .*{message}"):
        read_manifest(d)


def test_a_manifest_from_before_the_field_loads_and_is_counted(small_shards: Path, tmp_path: Path) -> None:
    stored = stored_stats(small_shards / "valid", read_manifest(small_shards / "valid"))
    d = _copy_with(small_shards, tmp_path, lambda raw: raw.pop(FIELD))
    m = read_manifest(d)
    assert m.token_stats is None and stored_stats(d, m) is None
    verify_set(d)  # nothing to recount: an old set verifies as before
    logged = []
    assert group_stats([str(d)], None, 0, 1, one_process, logged.append) == stored
    assert f"manifest without {FIELD}" in logged[0]
    # Written back without stats, the manifest has no such key at all (as before the field existed).
    write_manifest(d, Manifest(**{**m.__dict__}))
    assert FIELD not in json.loads((d / "manifest.json").read_text())


def test_readers_ignore_fields_they_do_not_know(small_shards: Path, tmp_path: Path) -> None:
    """The compatibility rule that lets a field be added within format version 1 (shard_set.py)."""
    d = _copy_with(small_shards, tmp_path, lambda raw: raw.update(a_later_field={"x": 1}))
    assert read_manifest(d) == read_manifest(small_shards / "valid")


def test_several_sets_combine_by_union_or_mixture(small_shards: Path) -> None:
    sets = [str(small_shards / "train"), str(small_shards / "valid")]
    counts = [count_tokens(s, read_manifest(s)) for s in sets]
    specials = read_manifest(sets[0]).special_ids  # the real tokenizer's: <mask> is its last id
    union = group_stats(sets, None, 0, 1, one_process)
    assert union == UnigramStats.from_counts(counts[0] + counts[1], specials)
    mixture = group_stats(sets, [0.25, 3.0], 0, 1, one_process)
    assert mixture == UnigramStats.from_counts(0.25 * counts[0] + 3.0 * counts[1], specials)
    assert union != mixture


def test_counting_split_across_ranks_sums_to_the_whole(small_shards: Path) -> None:
    """group_counts deals shards to ranks; the sum over ranks (what the all-reduce gives) is every count."""
    from roberta_ds.data.unigram import group_counts

    sets = [str(small_shards / "train"), str(small_shards / "valid")]
    parts = [group_counts(sets, rank, 3, one_process)[1] for rank in range(3)]
    whole = group_counts(sets, 0, 1, one_process)[1]
    assert all(p.sum() < whole.sum() for p in parts[:2]) and np.array_equal(sum(parts), whole)


def test_merge_stores_stats_of_the_merged_set(small_shards: Path, tmp_path: Path) -> None:
    m = merge_shard_sets([small_shards / "train", small_shards / "valid"], tmp_path / "all")
    both = [count_tokens(small_shards / s, read_manifest(small_shards / s)) for s in ("train", "valid")]
    assert stored_stats(tmp_path / "all", m) == UnigramStats.from_counts(both[0] + both[1], m.special_ids)
    verify_set(tmp_path / "all")
