"""`roberta-ds quickstart`: the whole pipeline on the built-in corpus (or your files), no download.

corpus (the standard library's docstrings and comments, or --corpus PATH...) -> byte-level BPE
tokenizer -> shards (+ verify, + unigram baselines) -> a small RoBERTa trained on 2 CPU ranks (or
every GPU) through the `deepspeed` launcher -> committed checkpoint -> Hugging Face export (checked
against our model) -> fill-mask on held-out sentences -> a summary that sets the validation loss and
accuracy against the context-free baselines. About 3 minutes on 2 CPU cores; the settings and why
they are not the RoBERTa recipe: quickstart_settings.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from roberta_ds.errors import UserError
from roberta_ds.quickstart.settings import QuickstartSettings

INPUTS_FILE = "quickstart_inputs.json"
"""What an output directory was made from; a rerun with other inputs is refused (or --fresh)."""


def launcher_env(venv_bin: Path | None = None) -> dict[str, str]:
    """Environment for launching DeepSpeed ranks from this interpreter's venv.

    The venv's bin first on PATH (the `deepspeed` launcher and one ninja for the JIT-built CPU comm
    op), a per-venv extension cache (so it is built once, not per run), and DeepSpeed's CPU
    accelerator when there is no GPU.
    """
    import torch

    env = dict(os.environ)
    bin_dir = venv_bin or Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def deepspeed_launcher() -> list[str]:
    """The `deepspeed` launcher of this interpreter: the script beside it (a venv), else the same entry
    point as a module (DeepSpeed installed with `pip --target`, as on the GPU machines: no script)."""
    script = Path(sys.executable).parent / "deepspeed"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def _step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def parse_args(argv: list[str]) -> argparse.Namespace:
    d = QuickstartSettings()
    p = argparse.ArgumentParser(prog="roberta-ds quickstart", description=__doc__.splitlines()[0])
    p.add_argument("--corpus", nargs="+", metavar="PATH",
                   help="your own text instead of the built-in corpus: .txt (a blank line between documents), "
                        ".jsonl (--text-field), .gz of either, or directories of them (searched recursively)")
    p.add_argument("--text-field", default="text", help="the JSONL field holding the text (default: text)")
    p.add_argument("--on-decode-error", default="strict", choices=("strict", "replace"),
                   help="non-UTF-8 input: stop naming the file and line (strict, default) or replace the bytes")
    p.add_argument("--out", default="quickstart_out", help="working directory (default: ./quickstart_out)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps to train (default: {d.steps})")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help=f"BPE vocabulary (default: {d.vocab_size})")
    p.add_argument("--ranks", type=int, default=None, help="processes (default: GPUs, or 2 on CPU)")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    return p.parse_args(argv)


def corpus_files(args: argparse.Namespace, out: Path) -> tuple[list[Path], str]:
    """The corpus files and a description: the user's (--corpus) or the built-in corpus written to out/corpus."""
    from data_tools.builtin_corpus import write_builtin_corpus
    from data_tools.text_input import resolve_inputs

    if args.corpus:
        files = resolve_inputs(args.corpus, recursive=True)
        shown = args.corpus if len(args.corpus) <= 3 else [*args.corpus[:2], f"... ({len(args.corpus)} paths)"]
        return files, f"your corpus: {', '.join(shown)}"
    out.mkdir(parents=True, exist_ok=True)
    return write_builtin_corpus(out / "corpus", min_chars=40, comments=True), \
        "built-in corpus: docstrings and comments of the Python standard library"


def check_inputs(out: Path, files: list[Path], settings: QuickstartSettings, reading: dict[str, str]) -> None:
    """Refuse an output directory made from other inputs or settings (its tokenizer and shards would be
    reused); record the inputs of a new one."""
    stamp = {"corpus": [[str(f.resolve()), f.stat().st_size] for f in files], **reading,
             "settings": dataclasses.asdict(settings)}
    path = out / INPUTS_FILE
    if path.is_file():
        if json.loads(path.read_text()) != stamp:
            raise UserError(f"{out}: made by an earlier quickstart from other inputs or settings ({path}); "
                            "pass --fresh to replace it, or choose another --out")
        return
    from roberta_ds.durable import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(stamp, indent=1).encode())


def build_data(files: list[Path], out: Path, settings: QuickstartSettings,
               reading: dict[str, str]) -> tuple[Path, Path]:
    """Steps 2 and 3: the tokenizer and the verified train/valid shard sets. Returns (tokenizer, shards).
    `reading`: text_field and on_decode_error, as build-shards takes them."""
    from data_tools.build_shards import build_shards
    from data_tools.train_tokenizer import train_tokenizer
    from roberta_ds.data.shard_set import verify_set
    from roberta_ds.data.unigram import describe, stored_stats

    t = _step(f"2/6 byte-level BPE tokenizer, vocab {settings.vocab_size:,}")
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(files, tok_dir, vocab_size=settings.vocab_size, **reading)
    print(f"{tok_dir} ({time.perf_counter() - t:.1f}s)")

    t = _step("3/6 shards (.bin/.idx + manifest), a full verify, the unigram baselines")
    shards = out / "shards"
    build_shards(files, tok_dir, shards, workers=min(2, os.cpu_count() or 1), **reading,
                 valid_fraction=settings.valid_fraction, seed=settings.seed)
    for split in ("train", "valid"):
        m = verify_set(shards / split)
        print(f"{split}: {m.documents:,} documents, {m.sequences:,} sequences, {m.tokens:,} tokens: verified")
        if m.tokens == 0:
            raise UserError(f"{shards / split}: no tokens; the corpus is too small for a {split} split "
                            f"({len(files)} file(s)); give more text")
        stats = stored_stats(shards / split, m)
        if stats is not None:
            print(f"  {describe('context-free baseline', stats)}")
    print(f"({time.perf_counter() - t:.1f}s)")
    return tok_dir, shards


def train(out: Path, tok_dir: Path, shards: Path, settings: QuickstartSettings, ranks: int) -> float:
    """Step 4: the 2-rank (or all-GPU) DeepSpeed run. Returns its wall time in seconds."""
    import torch

    from roberta_ds.data.blocks import build_block_index
    from roberta_ds.data.shard_set import open_shards
    from roberta_ds.data.tokenizer import load_tokenizer_info

    gpus = torch.cuda.device_count()
    t = _step(f"4/6 pretraining a small RoBERTa for {settings.steps:,} steps under DeepSpeed")
    print(settings.describe(ranks, "GPU" if gpus else "CPU", load_tokenizer_info(tok_dir).vocab_size), flush=True)
    _, readers = open_shards(shards / "valid")
    valid_blocks = len(build_block_index(readers, settings.seq_len, "full-sentences"))
    run = out / "run"
    cfg = settings.train_config(shards=shards, tokenizer=tok_dir, run_dir=run, valid_blocks=valid_blocks,
                                ranks=ranks)
    cfg_path = out / "train_config.json"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    ds_set = settings.ds_overrides(ranks, gpus=bool(gpus))
    cmd = [*deepspeed_launcher(), "--num_gpus", str(ranks), "--master_port", str(29600 + os.getpid() % 1000),
           "--module", "roberta_ds.train", "--config", str(cfg_path), *ds_set]
    print(" ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=launcher_env())
    if proc.returncode != 0:
        raise UserError(f"training failed with exit code {proc.returncode} (see the log above)")
    seconds = time.perf_counter() - t
    print(f"({seconds:.1f}s)")
    return seconds


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    settings = QuickstartSettings(steps=args.steps, vocab_size=args.vocab_size)
    import torch

    ranks = args.ranks or torch.cuda.device_count() or 2
    settings.micro_batch(ranks)  # a rank count that does not divide the batch is refused before any work
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    t_all = time.perf_counter()

    t = _step("1/6 corpus")
    files, what = corpus_files(args, out)  # a missing --corpus path stops here, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    reading = {"text_field": args.text_field, "on_decode_error": args.on_decode_error}
    check_inputs(out, files, settings, reading)
    size = sum(f.stat().st_size for f in files)
    print(f"{what}: {len(files)} file(s), {size / 1e6:.1f} MB ({time.perf_counter() - t:.1f}s)")

    tok_dir, shards = build_data(files, out, settings, reading)
    train_s = train(out, tok_dir, shards, settings, ranks)

    t = _step("5/6 Hugging Face export (logits checked against our model)")
    from roberta_ds.hf.convert import export_hf

    hf = out / "hf"
    shutil.rmtree(hf, ignore_errors=True)  # a rerun replaces the previous export
    export_hf(hf, out / "run" / "tokenizer", checkpoint=out / "run" / "checkpoints")
    print(f"{hf} ({time.perf_counter() - t:.1f}s)")

    _step("6/6 fill-mask (transformers.pipeline on the export) on held-out sentences of the validation split")
    from roberta_ds.quickstart.fill import fill_mask, format_example, validation_examples

    examples = validation_examples(shards / "valid", tok_dir)
    if not examples:
        print("(the validation split holds no prose sentence of 8-24 tokens to mask)")
    for example, preds in zip(examples, fill_mask(hf, examples) if examples else []):
        print(format_example(example, preds))

    from roberta_ds.quickstart.report import read_result, summary_lines

    _step("summary")
    result = read_result(out / "run" / "metrics.jsonl")
    for line in summary_lines(result, steps=settings.steps, global_batch=settings.global_batch,
                              seq_len=settings.seq_len, hf_dir=hf, wall_s=time.perf_counter() - t_all,
                              train_s=train_s):
        print(line)
    return 0
