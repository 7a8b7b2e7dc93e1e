"""Data pipeline benchmarks: masked-batch throughput vs Hugging Face, and opening a 1B-token corpus.

    python bench/loader.py                 # full: 20 s per throughput case, 1B tokens / 50M sentences
    python bench/loader.py --quick         # CPU smoke run: 3 s per case, 20M tokens / 1M sentences

(1) Throughput, one process, one thread (so the numbers are per core), on the same blocks in the
    same run. Shards are built from the built-in corpus (stdlib docstrings: real English text) with
    our tokenizer and build-shards, into --work (reused when present).
      ours: stream index -> (source, block) -> os.pread of the block's tokens -> row assembly ->
            dynamic masking -> torch tensors (exactly a DataLoader worker's job, in-process);
      HF:   `DataCollatorForLanguageModeling(mlm_probability=0.15)` over the same rows given as
            Python lists with their `special_tokens_mask`, as `run_mlm.py` feeds it. Reading the
            rows is not counted for HF (favouring it).
    Sequences/s by wall clock and per CPU-second of this process (steadier on a shared machine).
(2) Opening a synthetic corpus: a valid `.idx` written with numpy (geometric sentence lengths, some
    sentences longer than a block, documents of ~10 sentences) and a sparse `.bin` of the right
    size (truncate: no real disk), then `open_train_data` in a fresh subprocess: wall time, peak
    RSS (VmHWM, includes the .idx pages mapped while packing), and the peak Python/numpy heap
    (tracemalloc, second run) against the block index's own size.
Prints tables; asserts nothing (timings on a shared machine are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (str(REPO), str(REPO / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np
from synthetic_data import write_synthetic_index


def build_real_shards(work: Path) -> tuple[Path, Path]:
    """Built-in corpus -> byte-level BPE tokenizer -> shards; returns (train set dir, tokenizer dir)."""
    from data_tools.build_shards import build_shards
    from data_tools.builtin_corpus import write_builtin_corpus
    from data_tools.train_tokenizer import train_tokenizer

    tok_dir, shards = work / "tokenizer", work / "shards"
    if not (shards / "train" / "manifest.json").is_file():
        files = write_builtin_corpus(work / "corpus")
        if not (tok_dir / "tokenizer.json").is_file():
            train_tokenizer(files, tok_dir, vocab_size=50265)
        build_shards(files, tok_dir, shards, valid_fraction=0.0, overwrite=True)
    return shards / "train", tok_dir


def _rate(fn, seconds: float, batch: int) -> dict:
    fn(0)  # warm up (caches, first chunk of the stream order)
    n, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds:
        fn(n + 1)
        n += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"seq_per_s": n * batch / wall, "seq_per_cpu_s": n * batch / cpu}


def bench_throughput(seconds: float, batch: int, work: Path) -> None:
    import torch
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    from roberta_ds.config import DataConfig, DataSource
    from roberta_ds.data.loader import MicroBatchDataset, open_train_data
    from roberta_ds.data.masking import MaskingCollator, MaskSpec
    from roberta_ds.data.sampling import BatchPlan

    torch.set_num_threads(1)
    train, tok_dir = build_real_shards(work)
    cfg = DataConfig(train=(DataSource(str(train)),), max_seq_len=512, num_workers=0)
    data = open_train_data(cfg)
    n_blocks = data.samples_per_epoch
    full = float((data.sources[0].blocks.row_lengths >= 500).mean())
    print(
        f"\n(1) throughput: {data.manifest.tokens:,} tokens, {n_blocks} blocks of <= 512 "
        f"({full:.0%} >= 500 tokens), micro-batch {batch}, 1 thread"
    )
    spec = MaskSpec.make(cfg, data.vocab_size, data.special_ids)
    ds = MicroBatchDataset(
        data,
        MaskingCollator(spec, cfg.seed),
        plan=BatchPlan.of(batch, 1, 1),
        rank=0,
        start_step=0,
    )
    ours = _rate(lambda i: ds[i], seconds, batch)

    # The same rows, as HF would get them: lists of ids (pads stripped) + special_tokens_mask.
    special = np.zeros(data.vocab_size, dtype=bool)
    special[list(data.special_ids.values())] = True
    examples = []
    for i in range(max(1, min(n_blocks, 4096) // batch)):
        src, block, _ = data.locate(ds.indices(i))
        rows, _ = data.rows(src, block)
        for r in rows:
            ids = r[r != data.special_ids["pad"]]
            examples.append(
                {"input_ids": ids.tolist(), "special_tokens_mask": special[ids].astype(int).tolist()}
            )
    hf_tok = AutoTokenizer.from_pretrained(str(tok_dir))
    hf = DataCollatorForLanguageModeling(tokenizer=hf_tok, mlm_probability=0.15)
    n_ex = len(examples) // batch
    hf_rate = _rate(lambda i: hf(examples[(i % n_ex) * batch : (i % n_ex + 1) * batch]), seconds, batch)
    check = hf(examples[:batch])
    assert check["input_ids"].shape[0] == batch

    print(f"{'pipeline':<52} {'seq/s (wall)':>13} {'seq/CPU-s':>11}")
    print(
        f"{'ours: pread + pack + mask + tensors':<52} {ours['seq_per_s']:>13,.0f} "
        f"{ours['seq_per_cpu_s']:>11,.0f}"
    )
    print(
        f"{'HF DataCollatorForLanguageModeling (collate only)':<52} {hf_rate['seq_per_s']:>13,.0f} "
        f"{hf_rate['seq_per_cpu_s']:>11,.0f}"
    )
    print(
        f"{'ratio ours / HF':<52} {ours['seq_per_s'] / hf_rate['seq_per_s']:>13.2f}x "
        f"{ours['seq_per_cpu_s'] / hf_rate['seq_per_cpu_s']:>10.2f}x"
    )


def _proc_status() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def open_case(path: str, trace: bool) -> dict:
    """Runs in a fresh subprocess: open the set, report time and memory."""
    import tracemalloc

    from roberta_ds.config import DataConfig, DataSource
    from roberta_ds.data.loader import open_train_data

    cfg = DataConfig(train=(DataSource(path),), max_seq_len=512)
    before = _proc_status()["VmRSS"]  # torch, numpy and the package imported
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    data = open_train_data(cfg)
    seconds = time.perf_counter() - t0
    blocks = data.sources[0].blocks
    out = {
        "rss_before": before,
        "seconds": seconds,
        "blocks": len(blocks),
        "index_bytes": blocks.nbytes,
        **_proc_status(),
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if trace:
        out["heap_peak"] = tracemalloc.get_traced_memory()[1]
    return out


def bench_open(tokens: int, sentences: int, shards: int, work: Path) -> None:
    path = work / f"synthetic-{tokens}-{sentences}-{shards}"
    t0 = time.perf_counter()
    if not (path / "manifest.json").is_file():
        totals = write_synthetic_index(path, tokens, sentences, shards)
    else:
        from roberta_ds.data.shard_set import read_manifest

        m = read_manifest(path)
        totals = {"tokens": m.tokens, "sentences": m.sequences, "documents": m.documents}
    made = time.perf_counter() - t0
    idx_mb = sum(p.stat().st_size for p in path.glob("*.idx")) / 2**20
    print(
        f"\n(2) opening a synthetic corpus: {totals['tokens']:,} tokens, {totals['sentences']:,} sentences, "
        f"{totals['documents']:,} documents in {shards} shards "
        f"(.idx {idx_mb:,.0f} MiB, written in {made:.1f} s; "
        "page cache warm)"
    )
    results = {}
    for trace in (False, True):
        cmd = [sys.executable, __file__, "--_open", str(path)] + (["--_trace"] if trace else [])
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False
        )
        if proc.returncode:
            sys.exit(f"open case failed:\n{proc.stderr}")
        results[trace] = json.loads(proc.stdout.strip().splitlines()[-1])
    r, tr = results[False], results[True]
    mib = 2**20
    print(f"{'open_train_data (pack FULL-SENTENCES, blend)':<46} {r['seconds']:>8.1f} s   (goal < 30 s)")
    print(f"{'blocks':<46} {r['blocks']:>10,}")
    print(
        f"{'block index size':<46} {r['index_bytes'] / mib:>8.1f} MiB  "
        f"({r['index_bytes'] / r['blocks']:.1f} B/block)"
    )
    print(f"{'peak heap while opening (tracemalloc)':<46} {tr['heap_peak'] / mib:>8.1f} MiB")
    print(f"{'RSS before opening (imports: torch, numpy)':<46} {r['rss_before'] / mib:>8.1f} MiB")
    print(f"{'peak RSS (VmHWM, incl. mapped .idx pages)':<46} {r['VmHWM'] / mib:>8.1f} MiB")
    print(
        f"{'RSS after open: anonymous / file-backed':<46} {r['RssAnon'] / mib:>8.1f} / "
        f"{r['RssFile'] / mib:.1f} MiB"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: short timings, a 20M-token index")
    p.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/roberta-ds-bench-loader"),
        help="scratch directory (shards and synthetic index are reused from here)",
    )
    p.add_argument("--batch", type=int, default=32, help="micro-batch size (sequences)")
    p.add_argument("--seconds", type=float, default=None, help="time per throughput case")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-open", action="store_true")
    p.add_argument("--_open", help=argparse.SUPPRESS)
    p.add_argument("--_trace", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._open:
        print(json.dumps(open_case(args._open, args._trace)))
        return
    seconds = args.seconds or (3.0 if args.quick else 20.0)
    print(f"bench/loader.py on {os.cpu_count()} CPU(s); other work on this machine skews wall-clock numbers")
    if not args.skip_throughput:
        bench_throughput(seconds, args.batch, args.work)
    if not args.skip_open:
        if args.quick:
            bench_open(20_000_000, 1_000_000, 2, args.work)
        else:
            bench_open(1_000_000_000, 50_000_000, 4, args.work)


if __name__ == "__main__":
    main()
