"""Preprocessing throughput: our build_shards vs the tokenizer's own ceiling vs a Megatron-style baseline.

    python bench/preprocess.py                       # built-in corpus repeated to 40 MB, workers 1 and 2
    python bench/preprocess.py --mb 10 --workers 1,2,4 --tokenizer tok/ --corpus data/*.jsonl

On the same corpus and cores, each case in its own subprocess (so peak memory is its own):
  (a) ours: `build_shards` end to end (read, split, tokenize, write .bin/.idx, checksums, manifests)
  (b) ceiling: `Tokenizer.encode_batch` (and `encode_batch_fast`) over the same documents already in
      memory, using every core; nothing read or written
  (c) Megatron-style: megatron-core `IndexedDatasetBuilder` fed by per-document `encode` in a
      `multiprocessing.Pool` (`imap`, chunksize 32), as Megatron's tools/preprocess_data.py does
MB/s counts the UTF-8 bytes of the documents' text. Peak RSS is the largest single process
(main or worker). Prints a table; asserts nothing (timings on a shared machine are noisy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def text_dir_documents(root: Path) -> list[str]:
    """One document per .txt file under `root` (sorted), e.g. python3-doc's reST sources."""
    docs = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.rglob("*.txt"))]
    return [d for d in docs if d.strip()]


def make_corpus(out: Path, mb: float, files: int = 8, text_dir: Path | None = None) -> list[Path]:
    """Documents (the built-in corpus, or `text_dir`'s files) repeated to at least `mb` MB of text,
    dealt over `files` JSONL files."""
    from data_tools.builtin_corpus import builtin_documents

    docs = text_dir_documents(text_dir) if text_dir else builtin_documents()
    lines = [json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs]
    size = sum(len(d.encode()) for d in docs)
    repeats = max(1, -(-int(mb * 1e6) // size))
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"corpus-{i:02d}.jsonl" for i in range(files)]
    with contextlib.ExitStack() as stack:  # every file closed, also when a write fails
        handles = [stack.enter_context(open(p, "w", encoding="utf-8")) for p in paths]
        n = 0
        for _ in range(repeats):
            for line in lines:
                handles[n % files].write(line)
                n += 1
    return paths


def _documents(paths: list[str]) -> list[str]:
    from data_tools.text_input import iter_documents

    return list(iter_documents([Path(p) for p in paths]))


# ----------------------------------------------------------------------------------------------
# Cases (each runs in a fresh subprocess: python bench/preprocess.py --case NAME ...)


def case_ours(args) -> dict:
    from data_tools.build_shards import build_shards

    with tempfile.TemporaryDirectory() as tmp:
        cpu, t = _cpu(), time.perf_counter()
        m = build_shards(args.corpus, args.tokenizer, Path(tmp) / "out", workers=args.n, valid_fraction=0.01)
        dt, cpu = time.perf_counter() - t, _cpu() - cpu
    return {"seconds": dt, "cpu_seconds": cpu, "tokens": m["train"].tokens + m["valid"].tokens}


def _cpu() -> float:
    """CPU seconds of this process and its finished children (pool workers are joined in the timed part)."""
    return sum(
        r.ru_utime + r.ru_stime
        for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )


def case_ceiling(args) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
    docs = _documents(args.corpus)
    method = tok.encode_batch_fast if args.fast else tok.encode_batch
    cpu, t = _cpu(), time.perf_counter()
    encs = method(docs, add_special_tokens=False)
    dt, cpu = time.perf_counter() - t, _cpu() - cpu
    return {"seconds": dt, "cpu_seconds": cpu, "tokens": sum(len(e.ids) for e in encs)}


_mega_tok = None


def _mega_init(tokenizer_json: str) -> None:
    global _mega_tok
    from tokenizers import Tokenizer

    _mega_tok = Tokenizer.from_str(tokenizer_json)


def _mega_encode(line: str) -> list[int]:
    return _mega_tok.encode(json.loads(line)["text"], add_special_tokens=False).ids


def case_megatron(args) -> dict:
    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    tok_json = (Path(args.tokenizer) / "tokenizer.json").read_text()
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_str(tok_json).get_vocab_size()
    with tempfile.TemporaryDirectory() as tmp:
        cpu, t = _cpu(), time.perf_counter()
        pool = multiprocessing.Pool(args.n, _mega_init, (tok_json,))
        builder = IndexedDatasetBuilder(f"{tmp}/mega.bin", dtype=DType.optimal_dtype(vocab))
        tokens = 0
        for path in args.corpus:
            with open(path, encoding="utf-8") as fin:
                for ids in pool.imap(_mega_encode, fin, 32):
                    builder.add_document(np.asarray(ids), [len(ids)])
                    tokens += len(ids)
        builder.finalize(f"{tmp}/mega.idx")
        pool.close()
        pool.join()
        dt, cpu = time.perf_counter() - t, _cpu() - cpu
    return {"seconds": dt, "cpu_seconds": cpu, "tokens": tokens}


CASES = {"ours": case_ours, "ceiling": case_ceiling, "megatron": case_megatron}


def run_case(name: str, corpus: list[Path], tokenizer: Path, n: int = 0, fast: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--case", name, "--tokenizer", str(tokenizer), "--n", str(n)]
    cmd += ["--fast"] if fast else []
    cmd += ["--corpus", *map(str, corpus)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"case {name} failed:\n{err}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=40.0, help="built-in corpus repeated to this many MB")
    p.add_argument("--corpus", nargs="+", help="use these JSONL files instead of the built-in corpus")
    p.add_argument(
        "--text-dir",
        type=Path,
        help="one document per .txt file under this directory instead of the "
        "built-in corpus (e.g. /usr/share/doc/python3.11/html/_sources from Debian's python3-doc)",
    )
    p.add_argument(
        "--vocab-size", type=int, default=50265, help="vocabulary of the tokenizer trained when none is given"
    )
    p.add_argument(
        "--tokenizer", help="tokenizer dir (default: train a 50,265-vocab BPE on the built-in corpus)"
    )
    p.add_argument("--workers", default="1,2", help="worker counts for (a) and (c)")
    p.add_argument("--skip-megatron", action="store_true")
    p.add_argument(
        "--repeat", type=int, default=1, help="run every case N times, interleaved; report the best"
    )
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.case:  # child: run one case, print its figures as the last line
        result = CASES[args.case](args)
        after = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        result["peak_rss_mb"] = max(a.ru_maxrss for a in after) / 1024
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if args.corpus:
            corpus = [Path(c) for c in args.corpus]
        else:
            corpus = make_corpus(tmp_path / "corpus", args.mb, text_dir=args.text_dir)
        tokenizer = Path(args.tokenizer) if args.tokenizer else None
        if tokenizer is None:  # trained on one copy of the documents
            from data_tools.train_tokenizer import train_tokenizer

            once = corpus if args.corpus else make_corpus(tmp_path / "once", 0.0, text_dir=args.text_dir)
            tokenizer = train_tokenizer(once, tmp_path / "tok", vocab_size=args.vocab_size).parent
        from data_tools.text_input import ReadStats, iter_documents
        from roberta_ds.data.tokenizer import load_tokenizer_info

        stats = ReadStats()
        for _ in iter_documents(corpus, stats=stats):
            pass
        mb = stats.text_bytes / 1e6
        info = load_tokenizer_info(tokenizer)
        workers = [int(w) for w in args.workers.split(",")]
        cores = len(os.sched_getaffinity(0))
        print(
            f"corpus: {mb:.1f} MB of text, {stats.documents:,} documents, {len(corpus)} files; "
            f"tokenizer vocab {info.vocab_size:,}; {cores} cores; load avg {os.getloadavg()[0]:.1f}"
        )
        cases = [
            ("(b) encode_batch, all cores", "ceiling", 0, False),
            ("(b') encode_batch_fast, all cores", "ceiling", 0, True),
        ]
        cases += [(f"(a) ours build_shards, {n} worker(s)", "ours", n, False) for n in workers]
        if not args.skip_megatron:
            cases += [(f"(c) Megatron-style, {n} worker(s)", "megatron", n, False) for n in workers]
        best: dict[str, dict] = {}
        for _ in range(args.repeat):  # interleaved, best of N: the machine may be shared
            for name, case, n, fast in cases:
                r = run_case(case, corpus, tokenizer, n, fast)
                b = best.setdefault(name, r)
                for k in ("seconds", "cpu_seconds", "peak_rss_mb"):
                    b[k] = min(b[k], r[k])
        ceiling = best[cases[0][0]]["seconds"]
        print(
            f"best of {args.repeat}; CPU s = user + sys of all processes in the timed part (work done; less "
            "sensitive than wall time to other load on a shared machine)"
        )
        print("\n| case | wall s | MB/s | Mtokens/s | x (b) | CPU s | MB per CPU s | peak RSS MB |")
        print("|---|---|---|---|---|---|---|---|")
        for name, *_ in cases:
            r = best[name]
            print(
                f"| {name} | {r['seconds']:.2f} | {mb / r['seconds']:.2f} | {r['tokens'] / r['seconds'] / 1e6:.2f} "
                f"| {ceiling / r['seconds']:.2f} | {r['cpu_seconds']:.1f} | {mb / r['cpu_seconds']:.2f} "
                f"| {r['peak_rss_mb']:.0f} |"
            )


if __name__ == "__main__":
    main()
