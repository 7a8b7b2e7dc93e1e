"""`roberta-ds quickstart`: the whole pipeline on the built-in corpus, no download.

built-in corpus (the standard library's docstrings) -> byte-level BPE tokenizer -> shards (+ verify)
-> a tiny RoBERTa trained on 2 CPU ranks (or every GPU) through the `deepspeed` launcher ->
committed checkpoint -> Hugging Face export (checked against our model) -> a fill-mask example.
Under 10 minutes on 2 CPU cores; the loss falls from ~ln(vocab) to well below it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from roberta_ds.errors import UserError


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


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="roberta-ds quickstart", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="quickstart_out", help="working directory (default: ./quickstart_out)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps to train")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--ranks", type=int, default=None, help="processes (default: GPUs, or 2 on CPU)")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    args = p.parse_args(argv)

    import torch

    from data_tools.build_shards import build_shards
    from data_tools.builtin_corpus import write_builtin_corpus
    from data_tools.train_tokenizer import train_tokenizer
    from roberta_ds.shards import verify_set

    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    t = _step("1/6 built-in corpus: docstrings of the Python standard library")
    files = write_builtin_corpus(out / "corpus")
    size = sum(f.stat().st_size for f in files)
    print(f"{len(files)} files, {size / 1e6:.1f} MB ({time.perf_counter() - t:.1f}s)")

    t = _step(f"2/6 byte-level BPE tokenizer, vocab {args.vocab_size}")
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(files, tok_dir, vocab_size=args.vocab_size)
    print(f"{tok_dir} ({time.perf_counter() - t:.1f}s)")

    t = _step("3/6 shards (.bin/.idx + manifest), then a full verify")
    shards = out / "shards"
    build_shards(files, tok_dir, shards, workers=min(2, os.cpu_count() or 1))
    for split in ("train", "valid"):
        m = verify_set(shards / split)
        print(f"{split}: {m.documents} documents, {m.sequences} sequences, {m.tokens} tokens: verified")
    print(f"({time.perf_counter() - t:.1f}s)")

    t = _step(f"4/6 pretraining a tiny RoBERTa for {args.steps} steps under DeepSpeed")
    gpus = torch.cuda.device_count()
    ranks = args.ranks or (gpus if gpus else 2)
    run = out / "run"
    cfg = {
        "model": {"preset": "tiny", "dropout": 0.0, "attention_dropout": 0.0},
        "data": {"train": [str(shards / "train")], "valid": [str(shards / "valid")], "max_seq_len": 128,
                 "num_workers": 1},
        "optim": {"lr": 2e-3, "warmup_steps": max(1, args.steps // 10), "total_steps": args.steps},
        "tokenizer": str(tok_dir),
        "output_dir": str(run),
        "ds_config": str(Path(__file__).resolve().parent.parent / "ds_configs" / "zero2_bf16.json"),
        "log_interval": max(1, args.steps // 15),
        "eval_interval": max(1, args.steps // 3),
        "eval_batches": 4,
        "save_interval": args.steps,
        "keep_last": 1,
    }
    cfg_path = out / "train_config.json"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    ds_set = ["--ds-set", "train_batch_size=32", "--ds-set", f"train_micro_batch_size_per_gpu={32 // ranks}"]
    if not gpus:
        ds_set += ["--ds-set", "bf16.enabled=false"]  # fp32 on CPU: bf16 matmuls are slow there
    cmd = [*deepspeed_launcher(), "--num_gpus", str(ranks), "--master_port",
           str(29600 + os.getpid() % 1000), "--module", "roberta_ds.train", "--config", str(cfg_path), *ds_set]
    print(" ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=launcher_env())
    if proc.returncode != 0:
        raise UserError(f"training failed with exit code {proc.returncode} (see the log above)")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} ({time.perf_counter() - t:.1f}s)")

    t = _step("5/6 Hugging Face export (logits checked against our model)")
    from roberta_ds.convert_hf import export_hf

    hf = out / "hf"
    shutil.rmtree(hf, ignore_errors=True)  # a rerun replaces the previous export
    export_hf(hf, run / "tokenizer", checkpoint=run / "checkpoints")
    print(f"{hf} ({time.perf_counter() - t:.1f}s)")

    _step("6/6 fill-mask with transformers.pipeline on the export")
    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(hf), tokenizer=str(hf), device=-1)
    for text in ("Return the <mask> of the list.", "Raise a ValueError if the <mask> is not valid."):
        preds = fill(text, top_k=5)
        print(f"{text}\n  " + ", ".join(f"{p['token_str'].strip()!r} ({p['score']:.2f})" for p in preds))
    print(f"\nquickstart finished in {time.perf_counter() - t_all:.0f}s; outputs in {out}")
    return 0
