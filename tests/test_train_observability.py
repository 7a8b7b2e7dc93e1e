"""What a training run reports and how it stops, from one real 2-rank launch (CPU, gloo, fp32):

- whole-word masking with the trained tokenizer's word-start table: every micro-batch the model was
  given (dumped by the `dump@batch` fault) masks whole words only, words read independently of the
  masking code from the tokenizer's vocabulary and the shards' sentence starts;
- TensorBoard: the event file, read back with tensorboard's own EventAccumulator, holds the same
  scalars as metrics.jsonl (tensorboard is a test dependency: without it these tests fail, not skip);
- MFU against a hand computation for the tiny model (the formula of roberta_ds/engine/metrics.py), with
  peak_tflops=1 so that a CPU run reports it; tokens/s against the dumped batches' real tokens;
- peak memory: on CPU the field is the logging process's (rank 0's) peak resident set size in GiB
  (getrusage ru_maxrss), so it must exceed what torch + DeepSpeed alone take, stay below the
  machine's RAM, and never decrease;
- SIGUSR2 (a scheduler's preemption notice) to rank 0 during step index 3: both ranks finish that
  step, commit one checkpoint (step 4) together and exit 75 (requeue me); no step after it.

Cost: one launch of 4 steps, about 40 s on 2 cores.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from launch import run_trainer, tiny_args

from roberta_ds.checkpoint import commit as ckpt
from roberta_ds.engine.trainer import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow

STEPS = 6
SIGNAL_STEP = 3
"""SIGUSR2 arrives at the start of step index 3; the run stops after it, at step 4."""
SEQ, GLOBAL_BATCH, MICRO, RANKS = 64, 8, 2, 2
PEAK_TFLOPS = 1.0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Path, small_shards: Path):
    root = tmp_path_factory.mktemp("observe")
    out, dumps = root / "run", root / "dumps"
    args = tiny_args(small_tokenizer, small_shards, out, steps=STEPS, global_batch=GLOBAL_BATCH, micro=MICRO,
                     seq=SEQ, extra=["--ds-set", "bf16.enabled=false", "--set", "data.whole_word_mask=true",
                                     "--set", "tensorboard=true", "--set", f"peak_tflops={PEAK_TFLOPS}",
                                     "--set", "save_interval=100"])
    faults = f"dump={dumps}@batch:times=100; sigusr2@step:step={SIGNAL_STEP},rank=0"
    res = run_trainer(args, ranks=RANKS, env={"ROBERTA_DS_FAULTS": faults}, timeout=300)
    print(f"launch: {res.seconds:.1f} s")
    return res, out, dumps


def _records(res) -> list[dict]:
    return [r for r in res.metrics() if "loss" in r]


def test_sigusr2_saves_once_and_exits_for_requeue(run) -> None:
    res, out, _ = run
    assert res.returncode == REQUEUE_EXIT_CODE, res.output[-4000:]
    assert f"[fault] rank 0: sigusr2 at step step {SIGNAL_STEP}" in res.output
    stop = SIGNAL_STEP + 1
    assert f"[roberta-ds] stopped by SIGUSR2 at step {stop}; exiting with {REQUEUE_EXIT_CODE}" in res.output
    assert res.output.count("committed (signal SIGUSR2)") == 1
    assert [c.step for c in ckpt.committed(out / "checkpoints")] == [stop]
    assert ckpt.read_pointer(out / "checkpoints") == f"step_{stop:08d}"
    assert [r["step"] for r in _records(res)] == list(range(1, stop + 1))  # no step after the stop
    assert not (out / "run.lock").exists()


def _batches(dumps: Path) -> dict[tuple[int, int], list[dict[str, np.ndarray]]]:
    """{(step, rank): that rank's micro-batches of the step, in order}."""
    out: dict[tuple[int, int], list] = {}
    for f in sorted(dumps.glob("batch-step*-rank*-*.npz"), key=lambda p: int(p.stem.rsplit("-", 1)[1])):
        step, rank = (int(part.lstrip("steprank")) for part in f.stem.split("-")[1:3])
        out.setdefault((step, rank), []).append(dict(np.load(f)))
    return out


def test_whole_word_masking_with_the_trained_tokenizers_table(run, small_tokenizer: Path,
                                                              small_shards: Path) -> None:
    from tokenizers import Tokenizer

    from roberta_ds.config import DataConfig, DataSource
    from roberta_ds.data.loader import open_train_data

    _, _, dumps = run
    batches = _batches(dumps)
    stop = SIGNAL_STEP + 1
    assert sorted(batches) == [(s, r) for s in range(stop) for r in range(RANKS)]
    assert all(len(v) == GLOBAL_BATCH // (MICRO * RANKS) for v in batches.values())

    # Words from the vocabulary itself: a token opens a word when its byte-level form starts with the
    # space, newline, tab or CR marker; so does a special token, and a sentence's first token.
    tok = Tokenizer.from_file(str(small_tokenizer / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    specials = {tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")}
    opens = np.array([tok.id_to_token(i)[0] in "\u0120\u010a\u0109\u010d" for i in range(vocab)])
    assert 0.2 < opens.mean() < 0.9  # a real table: many words span several tokens
    data = open_train_data(DataConfig(train=(DataSource(str(small_shards / "train")),), max_seq_len=SEQ,
                                      whole_word_mask=True))

    masked_words = multi_token_words = masked_tokens = maskable_tokens = 0
    for b in (b for v in batches.values() for b in v):
        src, block, _ = data.locate(b["sample_index"])
        rows, sentence_starts = data.rows(src, block)
        for r in range(len(rows)):
            chosen = b["mlm_labels"][r] != -100
            pos = b["mlm_positions"][r][chosen]
            assert np.array_equal(b["mlm_labels"][r][chosen], rows[r][pos])  # labels: the shard's tokens
            unmasked = np.ones(SEQ, bool)
            unmasked[pos] = False
            assert np.array_equal(b["input_ids"][r][unmasked], rows[r][unmasked])
            special = np.isin(rows[r], list(specials))
            start = (opens[rows[r]] | sentence_starts[r] | np.r_[True, special[:-1]]) & ~special
            word = np.cumsum(start) - 1  # word index of each token (specials belong to none)
            is_masked = ~unmasked
            for w in np.unique(word[~special]):
                tokens = (word == w) & ~special
                assert is_masked[tokens].all() or not is_masked[tokens].any(), (
                    f"sample {b['sample_index'][r]}: word at {np.flatnonzero(tokens)} partly masked "
                    f"({np.flatnonzero(tokens & is_masked)})")
                if is_masked[tokens].all():
                    masked_words += 1
                    multi_token_words += int(tokens.sum() > 1)
            masked_tokens += int(is_masked.sum())
            maskable_tokens += int((~special).sum())
    print(f"{masked_words} masked words ({multi_token_words} of several tokens), "
          f"{masked_tokens}/{maskable_tokens} tokens masked")
    assert multi_token_words >= 10  # token-level masking would cut such words: this run did not
    assert 0.10 < masked_tokens / maskable_tokens < 0.20  # mask_prob 0.15


def test_tensorboard_event_file_holds_the_logged_scalars(run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res, out, _ = run
    files = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "mfu", "peak_mem_gib",
            "samples_consumed", "tokens_seen"} <= tags, tags
    records = _records(res)
    for tag in ("loss", "lr", "mfu", "peak_mem_gib", "tokens_per_s"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [r["step"] for r in records], tag
        for e, r in zip(events, records):
            assert e.value == pytest.approx(r[tag], rel=1e-6), (tag, e.step)  # stored as float32


def test_mfu_is_the_hand_computed_formula(run) -> None:
    """flops/token = 6 P_layers + 12 L s h + 6 (h^2 + h V) f for the tiny model: h 64, L 2, ffn 256,
    V 2048 (the tokenizer's), s 64; the head runs on K = ceil(0.15 (s - 2)) + 1 + 16 = 27 slots per
    row (+16 for whole words: masking.mask_slots), f = K / s. MFU = tokens/s x flops/token / (2 x 1e12)."""
    res, _, dumps = run
    h, L, ffn, V, s = 64, 2, 256, 2048, 64
    K = math.ceil(0.15 * (s - 2)) + 1 + 16
    p_layers = L * (4 * h * h + 2 * h * ffn)  # 98,304
    flops_token = 6 * p_layers + 12 * L * s * h + 6 * (h * h + h * V) * K / s
    assert (K, flops_token) == (27, 589_824 + 98_304 + 342_144)
    batches = _batches(dumps)
    for r in _records(res):
        hand = r["tokens_per_s"] * flops_token / (RANKS * PEAK_TFLOPS * 1e12)
        assert r["mfu"] == pytest.approx(hand, rel=1e-9)
        # tokens/s is real tokens over wall time: its ratio to samples/s is the step's tokens per sample
        step_batches = [b for rank in range(RANKS) for b in batches[(r["step"] - 1, rank)]]
        tokens = sum(int(b["num_tokens"]) for b in step_batches)
        assert r["tokens_per_s"] / r["samples_per_s"] == pytest.approx(tokens / GLOBAL_BATCH, rel=1e-9)
        assert 0 < r["mfu"] < 1


def test_peak_memory_is_rank0s_peak_rss(run) -> None:
    import psutil

    res, _, _ = run
    peaks = [r["peak_mem_gib"] for r in _records(res)]
    ram_gib = psutil.virtual_memory().total / 2**30
    print(f"peak_mem_gib {peaks}, machine RAM {ram_gib:.1f} GiB")
    assert all(0.3 < p < ram_gib for p in peaks)  # torch + DeepSpeed imported take more than 0.3 GiB
    assert peaks == sorted(peaks)  # a peak never decreases
