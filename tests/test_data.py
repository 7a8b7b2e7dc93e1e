"""The pipeline end to end on real (synthetic) shard sets: rows, loader determinism across worker
counts and batch splits, resume, blending, validation batches, and shards that change mid-run."""

from __future__ import annotations

import dataclasses
import os
import pickle

import numpy as np
import pytest
import torch
from synthetic_shards import SPECIALS, random_corpus, write_set

from roberta_ds.config import DataConfig, DataSource
from roberta_ds.data.loader import BatchPlan, DescriptorCache, open_train_data, train_loader, valid_batches
from roberta_ds.data.masking import IGNORE_INDEX, mask_slots
from roberta_ds.data.shards import ShardReader
from roberta_ds.errors import ConfigError, ShardFormatError

T = 48


@pytest.fixture
def shard_set(tmp_path):
    return write_set(tmp_path / "a", random_corpus(11, shards=2, docs=25, long_every=29, long_len=60))


def cfg_for(*paths, **kw) -> DataConfig:
    kw.setdefault("max_seq_len", T)
    kw.setdefault("num_workers", 0)
    return DataConfig(
        train=tuple(DataSource(str(p)) if not isinstance(p, DataSource) else p for p in paths), **kw
    )


def take(it, n):
    return [next(it) for _ in range(n)]


def expected_row(data, src, block):
    """A block's row and its sentence-start positions, rebuilt from ShardReader and the shard's
    index, independently of read_rows and its block index."""
    idx = data.sources[src].blocks
    r = ShardReader(data.sources[src].files[int(idx.shard[block])].path.with_suffix(""))
    start, n = int(idx.start[block]), int(idx.length[block])
    offsets = r.token_offsets()
    doc_starts = set(offsets[r.document_indices[:-1]].tolist())
    sentence_starts = set(offsets.tolist())
    tokens = r.read(start, n)
    row, starts = [SPECIALS["bos"]], []
    for t in range(start, start + n):
        if t in doc_starts and t != start and data.cfg.packing == "full-sentences":
            row.append(SPECIALS["eos"])
        if t in sentence_starts and t != start:
            starts.append(len(row))
        row.append(int(tokens[t - start]))
    return row + [SPECIALS["eos"]], starts


@pytest.mark.parametrize("packing", ["full-sentences", "doc-sentences"])
def test_rows_match_shards(shard_set, packing):
    cfg = cfg_for(shard_set, packing=packing, whole_word_mask=True)
    data = open_train_data(cfg)
    n = len(data.sources[0].blocks)
    blocks = np.arange(n)
    rows, sentence_starts = data.rows(np.zeros(n, np.int64), blocks)
    for b in range(n):
        want, starts = expected_row(data, 0, b)
        assert rows[b, : len(want)].tolist() == want and (rows[b, len(want) :] == SPECIALS["pad"]).all()
        assert np.flatnonzero(sentence_starts[b]).tolist() == starts
    assert data.samples_per_epoch == n and data.vocab_size == 1000 and data.special_ids == SPECIALS
    # Without whole-word masking no sentence starts are kept.
    assert open_train_data(cfg_for(shard_set)).rows(np.zeros(1, np.int64), blocks[:1])[1] is None


def test_whole_word_loader(shard_set):
    cfg = cfg_for(shard_set, whole_word_mask=True)
    data = open_train_data(cfg)
    table = np.zeros(1000, dtype=bool)
    table[::3] = True  # hand-made word-start table
    kw = dict(plan=BatchPlan.of(4, 1, 1), rank=0, start_step=0)
    with pytest.raises(ConfigError, match="word_start"):
        train_loader(data, cfg, **kw)
    a = take(train_loader(data, cfg, word_starts=table, **kw), 3)
    b = take(
        train_loader(data, cfg_for(shard_set, whole_word_mask=True, num_workers=2), word_starts=table, **kw),
        3,
    )
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert a[0]["mlm_positions"].shape == (4, mask_slots(cfg))
    src, block, _ = data.locate(np.arange(4))
    rows, starts = data.rows(src, block)
    pos, lab = a[0]["mlm_positions"].numpy(), a[0]["mlm_labels"].numpy()
    for r in range(4):
        chosen = set(pos[r][lab[r] != IGNORE_INDEX].tolist())
        maskable = rows[r] > 3
        for p in chosen:  # a chosen token that does not start a word continues a chosen word
            if not (table[rows[r, p]] or starts[r, p] or not maskable[p - 1]):
                assert p - 1 in chosen


def test_loader_contract_and_epoch_coverage(shard_set):
    cfg = cfg_for(shard_set)
    data = open_train_data(cfg)
    n = data.samples_per_epoch
    it = train_loader(data, cfg, plan=BatchPlan.of(4, 1, 1), rank=0, start_step=0)
    batches = take(it, -(-n // 4) + 1)
    k = mask_slots(cfg)
    b = batches[0]
    assert (
        b["input_ids"].shape == (4, T)
        and b["mlm_positions"].shape == (4, k)
        and b["mlm_labels"].shape == (4, k)
    )
    assert int(b["num_tokens"]) == int((b["input_ids"] != SPECIALS["pad"]).sum())
    idx = torch.cat([x["sample_index"] for x in batches]).tolist()
    assert idx == list(range(len(idx)))
    # Epoch 0 visits every block once; masked labels are the original tokens.
    src, block, _ = data.locate(np.arange(n))
    assert sorted(block.tolist()) == list(range(n))
    raw, _ = data.rows(src[:4], block[:4])
    lab, pos = b["mlm_labels"].numpy(), b["mlm_positions"].numpy()
    used = lab != IGNORE_INDEX
    assert (np.take_along_axis(raw, pos, axis=1)[used] == lab[used]).all()
    unmasked = np.ones_like(raw, bool)
    np.put_along_axis(unmasked, pos, ~used, axis=1)
    np.put_along_axis(unmasked, pos, False, axis=1)
    assert (b["input_ids"].numpy()[unmasked] == raw[unmasked]).all()


def test_worker_count_independence(shard_set):
    cfg0 = cfg_for(shard_set)
    cfg2 = cfg_for(shard_set, num_workers=2)
    data = open_train_data(cfg0)
    kw = dict(plan=BatchPlan.of(3, 2, 2), rank=1, start_step=0)
    a = take(train_loader(data, cfg0, **kw), 10)
    b = take(train_loader(data, cfg2, **kw), 10)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_same_data_whatever_the_split_and_resume(shard_set):
    cfg = cfg_for(shard_set)
    data = open_train_data(cfg)

    def consumed(micro, accum, world, steps, start=0):
        """sample index -> (input_ids row, labels row) for everything every rank consumes."""
        out = {}
        for r in range(world):
            it = train_loader(
                data, cfg, plan=BatchPlan.of(micro, accum, world), rank=r, start_step=start
            )
            for _ in range(steps * accum):
                b = next(it)
                for j, k in enumerate(b["sample_index"].tolist()):
                    out[k] = (b["input_ids"][j].tolist(), b["mlm_labels"][j].tolist())
        return out

    ref = consumed(4, 1, 1, steps=5)
    assert sorted(ref) == list(range(20))
    for micro, accum, world in [(2, 2, 1), (1, 2, 2), (2, 1, 2), (1, 1, 4)]:
        assert consumed(micro, accum, world, steps=5) == ref
    # Resuming at step 3 replays exactly what a fresh run consumed at steps 3 and 4.
    resumed = consumed(2, 1, 2, steps=2, start=3)
    assert resumed == {k: v for k, v in ref.items() if k >= 12}


def test_different_masks_next_epoch(shard_set):
    cfg = cfg_for(shard_set)
    data = open_train_data(cfg)
    n = data.samples_per_epoch
    it = train_loader(data, cfg, plan=BatchPlan.of(n, 1, 1), rank=0, start_step=0)
    e0, e1 = next(it), next(it)
    src, block, epoch = data.locate(np.arange(2 * n))
    assert (epoch[:n] == 0).all() and (epoch[n:] == 1).all()
    # The same block in both epochs gets a different mask.
    where1 = {int(b): i for i, b in enumerate(block[n:])}
    same = [(i, where1[int(b)]) for i, b in enumerate(block[:n])]
    diff = sum(not torch.equal(e0["mlm_positions"][i], e1["mlm_positions"][j]) for i, j in same)
    assert diff >= 0.9 * n


def test_blend_and_tokenizer_check(tmp_path):
    a = write_set(tmp_path / "a", random_corpus(1, shards=1, docs=30))
    b = write_set(tmp_path / "b", random_corpus(2, shards=2, docs=30))
    cfg = cfg_for(DataSource(str(a), 1.0), DataSource(str(b), 3.0))
    data = open_train_data(cfg)
    na, nb = (len(s.blocks) for s in data.sources)
    total = na + nb
    assert data.blend.counts == (int(total / 4 + 0.5), int(3 * total / 4 + 0.5))
    src, _, _ = data.locate(np.arange(data.samples_per_epoch))
    assert np.bincount(src).tolist() == list(data.blend.counts)
    batch = next(train_loader(data, cfg, plan=BatchPlan.of(8, 1, 1), rank=0, start_step=0))
    assert batch["input_ids"].shape == (8, T)

    c = write_set(tmp_path / "c", random_corpus(3, shards=1), tokenizer_sha256="cd" * 32)
    with pytest.raises(ConfigError, match=rf"{a}.*{c}.*different tokenizers"):
        open_train_data(cfg_for(a, c))
    with pytest.raises(ConfigError, match="data.train"):
        open_train_data(DataConfig())


def test_pickle_reopens_by_path(shard_set):
    data = open_train_data(cfg_for(shard_set))
    rows, _ = data.rows(np.zeros(5, np.int64), np.arange(5))
    blob = pickle.dumps(data)
    assert len(blob) < 100_000  # arrays + paths, no file contents
    clone = pickle.loads(blob)
    assert clone.sources[0].files[0]._fd is None  # reopened lazily
    assert (clone.rows(np.zeros(5, np.int64), np.arange(5))[0] == rows).all()


def first_block_of_shard(data, shard):
    return int(np.flatnonzero(data.sources[0].blocks.shard == shard)[0])


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_names_the_file(shard_set, workers):
    cfg = cfg_for(shard_set, num_workers=workers)
    data = open_train_data(cfg)
    it = train_loader(data, cfg, plan=BatchPlan.of(2, 1, 1), rank=0, start_step=0)
    next(it)
    victim = shard_set / "shard-001.bin"
    os.truncate(victim, victim.stat().st_size // 2)
    with pytest.raises(ShardFormatError, match=r"shard-001\.bin.*truncated"):
        for _ in range(200):
            next(it)
    # Reading a block past the new end directly also fails by name (short pread), not SIGBUS.
    f = data.sources[0].files[1]
    with pytest.raises(ShardFormatError, match=r"shard-001\.bin: truncated"):
        f.read(int(data.sources[0].blocks.start[-1]), 4)


@pytest.mark.parametrize("how", ["delete", "replace"])
def test_deleted_or_replaced_shard_names_the_file(shard_set, how):
    cfg = cfg_for(shard_set)
    data = open_train_data(cfg)
    b = first_block_of_shard(data, 0)
    data.rows(np.zeros(1, np.int64), np.array([b]))  # the descriptor is open now
    victim = shard_set / "shard-000.bin"
    if how == "delete":
        victim.unlink()
    else:
        copy = victim.with_name("copy")
        copy.write_bytes(victim.read_bytes())
        os.replace(copy, victim)  # same bytes, another file: still refused
    with pytest.raises(ShardFormatError, match=r"shard-000\.bin.*(deleted|replaced)"):
        data.rows(np.zeros(1, np.int64), np.array([b]))
    # A worker that reopens after the change is refused too.
    clone = pickle.loads(pickle.dumps(data))
    with pytest.raises(ShardFormatError, match=r"shard-000\.bin"):
        clone.rows(np.zeros(1, np.int64), np.array([b]))


def test_valid_batches(tmp_path):
    v = write_set(tmp_path / "v", random_corpus(7, shards=2, docs=6))
    cfg = DataConfig(valid=(DataSource(str(v)),), max_seq_len=T, num_workers=3)
    world, micro = 2, 3
    per_rank = [
        valid_batches(cfg, rank=r, world_size=world, micro_batch=micro, max_batches=100) for r in range(world)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) > 1
    again = valid_batches(cfg, rank=0, world_size=world, micro_batch=micro, max_batches=100)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(again, per_rank[0]) for k in x)
    idx = sorted(i for rb in per_rank for b in rb for i in b["sample_index"].tolist() if i >= 0)
    n_blocks = idx[-1] + 1
    assert idx == list(range(n_blocks))  # every block exactly once over the ranks
    filler = [(b, j) for rb in per_rank for b in rb for j in range(micro) if b["sample_index"][j] < 0]
    for b, j in filler:
        assert b["input_ids"][j, :2].tolist() == [SPECIALS["bos"], SPECIALS["eos"]]
        assert (b["mlm_labels"][j] == IGNORE_INDEX).all()
    assert len(valid_batches(cfg, rank=1, world_size=world, micro_batch=micro, max_batches=1)) == 1
    with pytest.raises(ConfigError, match="data.valid"):
        valid_batches(DataConfig(), rank=0, world_size=1, micro_batch=1, max_batches=1)


def test_loader_rejects_bad_arguments(shard_set):
    cfg = cfg_for(shard_set)
    data = open_train_data(cfg)
    with pytest.raises(ConfigError, match="rank"):
        train_loader(data, cfg, plan=BatchPlan.of(1, 1, 2), rank=2, start_step=0)
    with pytest.raises(ConfigError, match="data.seed"):
        train_loader(
            data, cfg_for(shard_set, seed=5), plan=BatchPlan.of(1, 1, 1), rank=0, start_step=0
        )


def test_descriptor_lru_reopens_safely(shard_set):
    data = open_train_data(cfg_for(shard_set), DescriptorCache(max_open=1))
    blocks = [first_block_of_shard(data, 0), first_block_of_shard(data, 1)]
    want, _ = data.rows(np.zeros(2, np.int64), np.array(blocks))
    f0, f1 = data.sources[0].files
    for _ in range(3):  # alternate shards: each read closes the other's descriptor
        for j, b in enumerate(blocks):
            got, _ = data.rows(np.zeros(1, np.int64), np.array([b]))
            assert (got[0] == want[j]).all()
    assert (f0._fd is None) != (f1._fd is None)
    # A shard replaced while its descriptor was closed is refused when reopened.
    victim = shard_set / "shard-000.bin"
    copy = victim.with_name("copy")
    copy.write_bytes(victim.read_bytes())
    os.replace(copy, victim)
    with pytest.raises(ShardFormatError, match=r"shard-000\.bin: replaced"):
        data.rows(np.zeros(1, np.int64), np.array([blocks[0]]))


def test_descriptor_caches_are_objects_not_module_state(shard_set):
    import roberta_ds.data.bin_file as bin_file
    import roberta_ds.data.reading as reading

    for mod in (bin_file, reading):  # no module-level table, list or cache that functions mutate
        held = [n for n, v in vars(mod).items() if not n.startswith("__") and (
            isinstance(v, (dict, list, set, bytearray)) or type(v).__module__.startswith("roberta_ds"))]
        assert held == [], f"{mod.__name__} keeps module-level state {held}"
    a, b = DescriptorCache(max_open=1), DescriptorCache(max_open=1)
    da, db = open_train_data(cfg_for(shard_set), a), open_train_data(cfg_for(shard_set), b)
    fa, fb = da.sources[0].files[0], db.sources[0].files[0]
    fa.fd(), fb.fd()
    assert len(a) == len(b) == 1  # each cache holds its own; neither evicted the other's
    da.sources[0].files[1].fd()  # evicts fa from a only
    assert fa._fd is None and fb._fd is not None and len(a) == len(b) == 1
    # Pickled together, a run's files share one fresh, empty cache (a DataLoader worker's).
    clone = pickle.loads(pickle.dumps(db))
    caches = {id(f.cache) for f in clone.sources[0].files}
    assert len(caches) == 1 and clone.sources[0].files[0].cache is not b
    assert len(clone.sources[0].files[0].cache) == 0 and clone.sources[0].files[0].cache.max_open == 1


def test_opening_writes_no_cache_file(shard_set):
    # No index cache at all, so ranks and nodes opening the same set can never race on one.
    before = sorted((p.name, p.stat().st_mtime_ns) for p in shard_set.iterdir())
    data = open_train_data(cfg_for(shard_set, packing="doc-sentences"))
    next(
        train_loader(
            data,
            cfg_for(shard_set, packing="doc-sentences"),
            plan=BatchPlan.of(2, 1, 1), rank=0,
            start_step=0,
        )
    )
    assert sorted((p.name, p.stat().st_mtime_ns) for p in shard_set.iterdir()) == before


def test_real_shards_end_to_end(small_shards, small_tokenizer):
    """Built-in corpus shards from the real tokenizer and build-shards, with its word-start table."""
    from roberta_ds.data.shards import tokenizer_fingerprint
    from roberta_ds.data.tokenizer import word_start_table

    train, valid = DataSource(str(small_shards / "train")), DataSource(str(small_shards / "valid"))
    cfg = DataConfig(train=(train,), valid=(valid,), max_seq_len=128, num_workers=2, whole_word_mask=True)
    data = open_train_data(cfg)
    assert len(data.sources[0].files) == 3 and data.tokenizer_sha256 == tokenizer_fingerprint(small_tokenizer)
    n = len(data.sources[0].blocks)
    for b in range(0, n, 23):
        want, starts = expected_row(data, 0, b)
        rows, sentence_starts = data.rows(np.zeros(1, np.int64), np.array([b]))
        assert rows[0, : len(want)].tolist() == want and np.flatnonzero(sentence_starts[0]).tolist() == starts
    table = word_start_table(small_tokenizer)
    kw = dict(plan=BatchPlan.of(4, 2, 2), rank=1, start_step=3, word_starts=table)
    with_workers = take(train_loader(data, cfg, **kw), 4)
    in_process = take(train_loader(data, dataclasses.replace(cfg, num_workers=0), **kw), 4)
    for x, y in zip(with_workers, in_process):
        assert all(torch.equal(x[k], y[k]) for k in x)
    labels = torch.stack([x["mlm_labels"] for x in with_workers])
    used = labels != IGNORE_INDEX
    assert used.any()
    assert not torch.isin(labels[used], torch.tensor(list(data.special_ids.values()))).any()
    val = valid_batches(cfg, rank=0, world_size=1, micro_batch=4, max_batches=3, word_starts=table)
    assert len(val) >= 1 and val[0]["input_ids"].shape == (4, 128)
