"""Training throughput of roberta-ds on one GPU, measured against Hugging Face side by side.

    python bench/train_throughput.py                        # every case, in priority order; table last
    python bench/train_throughput.py --cases base512_m64 hf_base512_m64 --budget-s 300
    python bench/train_throughput.py --smoke                # CPU: tiny analogues, a few steps (the CI check)
    bash bench/gpu_run.sh                                   # the prepared one-GPU run (see its header)

An `ours` case is the real training path, in-process: `train.setup()` builds the run exactly as
`roberta-ds train` does (DeepSpeed engine from ds_configs/zero2_bf16.json: bf16, ZeRO-2, clipping as
shipped (1.0 in the runs of bench/NOTES.md up to stop 17, 0.0 since),
or the shipped zero1_bf16.json / zero3_bf16.json for a case of that stage;
GuardedAdamW, fused; the model `torch.compile`d before `deepspeed.initialize`), then
`loop.Trainer.train_step()` runs optimizer steps of `accum` micro-batches from our DataLoader over
synthetic shards (Zipf-distributed ids, packed FULL-SENTENCES, dynamic masking), dropout 0.1.
  - throughput: `warmup` steps (compilation included), then `windows` windows of `steps` optimizer
    steps with the device synchronised at the window edges only; the trainer itself reads the host
    once per optimizer step. tokens/s = the median window, counted as the trainer counts them (real,
    non-padding tokens; `fill` = their share of the rows); MFU against 989 TFLOP/s (H100 SXM dense
    bf16 datasheet) with metrics.flops_per_token (head fraction K/T for our masked-only head);
  - phase shares: one more window with `Trainer(timed=True)` (it synchronises per phase, so its own
    rate is printed apart): share of step time outside forward+backward, and the data part of it;
  - recompiles: graphs torch.compile captured after warm-up (must be 0); on a GPU also the CUDA
    synchronisations per optimizer step (torch.cuda.set_sync_debug_mode, one extra step);
  - `parity`: same batches through our compiled bf16 DeepSpeed path and an eager fp32 RobertaMLM
    with the same initial weights and torch AdamW, dropout 0: per-step losses within bf16 tolerance
    and the cosine of the two parameter updates.
Baselines (bench/hf_baseline.py): HF RobertaForMaskedLM (sdpa) under DeepSpeed with the same ds_config
dict and micro batch (`hf_ds`), and compiled without DeepSpeed (`hf_compiled`).

Each case runs in its own process (clean CUDA memory statistics; a crash, OOM or timeout costs one
row) unless --in-process; logs go to --logs, one file per case. Numbers only count on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# This file: the CLI, the driver (one process per case, budget, JSON rows) and the final print.
# The pieces: cases.py (the case table), ours_case.py (our trainer in-process, timed), parity.py
# (bf16 DeepSpeed vs eager fp32), hf_baseline.py (the baselines and the window protocol),
# synthetic_data.py (tokenizer + shards), table.py (the table from the rows).
REPO = Path(__file__).resolve().parent.parent
for p in (str(REPO), str(REPO / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

from cases import BY_NAME, Case, blocked_by, goal_on, model_label, preset_of, resolve, steps_for
from ours_case import run_ours
from parity import run_parity
from synthetic_data import prepare_data
from table import fmt_rate, format_table

MIN_CASE_S = 40.0
"""A case is not started with less budget left than this (an import plus one compile)."""


def run_case(c: Case, opts: argparse.Namespace) -> dict[str, Any]:
    """One case in this process: its row (the case's shape, then what its runner measured)."""
    import torch
    from hf_baseline import run_hf

    from roberta_ds.config import model_config
    from roberta_ds.engine.ds_config import load_ds_config

    tok, train = opts.work / "tokenizer", opts.work / "shards" / "train"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    head = {
        "case": c.name,
        "model": model_label(c),
        "seq": c.seq,
        "micro": c.micro,
        "accum": c.accum,
        "goal": goal_on(c.goal, device),
        "device": device,
    }
    t0 = time.perf_counter()
    if c.impl == "ours":
        row = run_ours(c, opts, tok, train)
    elif c.impl == "parity":
        row = run_parity(c, opts, tok, train)
    else:
        from roberta_ds.data.tokenizer import load_tokenizer_info

        cfg = model_config(c.model, vocab_size=load_tokenizer_info(tok).vocab_size, **dict(c.overrides))
        ds = load_ds_config(
            REPO / "ds_configs" / "zero2_bf16.json", [f"zero_optimization.stage={c.zero}", *c.ds_sets]
        )
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        row = run_hf(
            cfg,
            seq=c.seq,
            micro=c.micro,
            accum=c.accum,
            mode=c.impl,
            ds=ds,
            compile_model=c.compile,
            warmup=opts.warmup,
            windows=opts.windows,
            steps=steps_for(c, opts),
            device=dev,
            peak_tflops=opts.peak_tflops,
        )
    return {**head, **row, "status": "ok", "case_s": time.perf_counter() - t0}


def child_command(c: Case, opts: argparse.Namespace, result: Path) -> list[str]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_case",
        c.name,
        "--_result",
        str(result),
        "--work",
        str(opts.work),
        "--warmup",
        str(opts.warmup),
        "--windows",
        str(opts.windows),
        "--steps",
        str(opts.steps),
        "--workers",
        str(opts.workers),
        "--parity-steps",
        str(opts.parity_steps),
        "--min-window-tokens",
        str(opts.min_window_tokens),
    ]
    if opts.peak_tflops:
        cmd += ["--peak-tflops", str(opts.peak_tflops)]
    if opts.smoke:
        cmd.append("--smoke")
    if opts.compile is not None:
        cmd.append("--compile" if opts.compile else "--no-compile")
    if opts.profile and preset_of(c) not in opts.profiled:
        cmd += ["--profile", str(opts.profile)]
    return cmd


def run_all(cases: list[Case], opts: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    broken: list[Case] = []  # failed for a reason other than memory: their model options are suspect
    t_start = time.perf_counter()
    opts.logs.mkdir(parents=True, exist_ok=True)
    for c in cases:
        left = opts.budget_s - (time.perf_counter() - t_start) if opts.budget_s else math.inf
        if left < MIN_CASE_S:
            rows.append(
                {"case": c.name, "status": "skipped", "error": f"budget ({opts.budget_s:.0f} s) spent"}
            )
            print(f"[bench] {c.name}: skipped (budget)", flush=True)
            continue
        b = blocked_by(c, broken)
        if b is not None:
            why = f"{b.name} failed with the same model options {sorted(dict(b.overrides))}"
            rows.append({"case": c.name, "status": "skipped", "error": why})
            print(f"[bench] {c.name}: skipped ({why})", flush=True)
            continue
        t0 = time.perf_counter()
        if opts.in_process:
            try:
                row = run_case(c, opts)
            except Exception as e:  # noqa: BLE001 - one failed case must not lose the others' rows
                traceback.print_exc()
                row = {"case": c.name, "status": "failed", "error": f"{type(e).__name__}: {e}"}
            finally:
                _release()
        else:
            result, log = opts.logs / f"{c.name}.json", opts.logs / f"{c.name}.log"
            result.unlink(missing_ok=True)
            timeout = min(opts.case_timeout_s, left)
            with open(log, "w") as f:
                try:
                    rc = subprocess.run(
                        child_command(c, opts, result),
                        stdout=f,
                        stderr=subprocess.STDOUT,
                        timeout=timeout,
                        cwd=str(REPO),
                        check=False,
                    ).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            if result.is_file():
                row = json.loads(result.read_text())
            else:
                tail = log.read_text(errors="replace").strip().splitlines()[-12:]
                status = "timeout" if rc == "timeout" else "failed"
                row = {
                    "case": c.name,
                    "status": status,
                    "error": f"rc {rc}; see {log}: " + " | ".join(tail)[-400:],
                }
        if c.impl == "ours" and row.get("status") == "ok":
            opts.profiled.add(preset_of(c))
        if row.get("status") == "failed" and "out of memory" not in row.get("error", "").lower():
            broken.append(c)
        rows.append(row)
        rate = fmt_rate(row.get("tokens_per_s")) + " tokens/s" if "tokens_per_s" in row else row.get("status")
        print(
            f"[bench] {c.name}: {row.get('status')} in {time.perf_counter() - t0:.0f} s ({rate})", flush=True
        )
    return rows


def _release() -> None:
    import torch

    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # --in-process: each case's peak is its own


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument(
        "--cases", nargs="+", default=None, help=f"case names (default: all): {', '.join(BY_NAME)}"
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny CPU analogues, a few steps (default without CUDA)"
    )
    p.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="torch.compile every case (default: per case on a GPU, off with --smoke)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--in-process", action="store_true", help="run every case in this process")
    p.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/roberta-ds-bench-train"),
        help="scratch: synthetic tokenizer + shards (reused), run dirs",
    )
    p.add_argument("--logs", type=Path, default=None, help="per-case logs and results (default: WORK/logs)")
    p.add_argument("--json", type=Path, default=None, help="write every row here")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="torch.profiler table of one step of the first `ours` case of each preset, into this directory",
    )
    p.add_argument("--warmup", type=int, default=None, help="optimizer steps before timing (GPU 2, smoke 1)")
    p.add_argument("--windows", type=int, default=None, help="timed windows (GPU 3, smoke 2)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per window (GPU 2, smoke 1)")
    p.add_argument(
        "--min-window-tokens",
        type=int,
        default=None,
        help="more steps per window for small batches (GPU 262144 positions, smoke 0)",
    )
    p.add_argument("--parity-steps", type=int, default=6)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (GPU 4, smoke 0)")
    p.add_argument("--tokens", type=int, default=None, help="synthetic corpus tokens (GPU 4M, smoke 200K)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="MFU denominator, TFLOP/s (default: 989, H100 SXM dense bf16; none with --smoke)",
    )
    p.add_argument("--budget-s", type=float, default=0.0, help="wall-clock budget for all cases (0: none)")
    p.add_argument("--case-timeout-s", type=float, default=420.0)
    p.add_argument("--_case", help=argparse.SUPPRESS)
    p.add_argument("--_result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    a.smoke = a.smoke or not gpu
    for name, g, s in (
        ("warmup", 2, 1),
        ("windows", 3, 2),
        ("steps", 2, 1),
        ("workers", 4, 0),
        ("tokens", 4_000_000, 200_000),
        ("min_window_tokens", 262_144, 0),
    ):
        if getattr(a, name) is None:
            setattr(a, name, s if a.smoke else g)
    if a.peak_tflops is None and not a.smoke:
        a.peak_tflops = 989.0
    a.logs = a.logs or a.work / "logs"
    a.profiled = set()
    unknown = [n for n in a.cases or [] if n not in BY_NAME]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {', '.join(BY_NAME)}")
    if min(a.warmup, a.windows, a.steps) < 1:
        p.error("--warmup, --windows and --steps must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported
    opts = parse_args(argv)
    if opts._case:  # a child: one case, its row to --_result
        row = run_case(resolve(BY_NAME[opts._case], opts), opts)
        opts._result.write_text(json.dumps(row))
        _teardown()
        return 0
    import torch

    gpu = torch.cuda.is_available() and not opts.smoke
    cases = [resolve(BY_NAME[n], opts) for n in (opts.cases or BY_NAME)]
    vocab = 2048 if opts.smoke else 50265
    t = time.perf_counter()
    prepare_data(opts.work, vocab, opts.tokens)
    print(
        f"[bench] synthetic data in {opts.work} ({opts.tokens:,} tokens, vocab {vocab}): "
        f"{time.perf_counter() - t:.1f} s",
        flush=True,
    )
    rows = run_all(cases, opts)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(rows, indent=1))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    peak = f"MFU vs {opts.peak_tflops:g} TFLOP/s" if opts.peak_tflops else "no MFU"
    print(
        f"\n== roberta-ds training throughput, one {device}; median of {opts.windows} windows of "
        f">= {opts.steps} optimizer steps (and >= {opts.min_window_tokens:,} positions) after "
        f"{opts.warmup} warm-up steps; {peak}"
        + ("" if gpu else "; SMOKE RUN: tiny models, numbers do not count")
    )
    print(format_table(rows, gpu), flush=True)
    _teardown()
    failed = [r["case"] for r in rows if r.get("status") in ("failed", "timeout")]
    bad_parity = [
        r["case"] for r in rows if r.get("impl") == "parity" and r.get("status") == "ok" and not r["ok"]
    ]
    return 1 if failed or bad_parity else 0


def _teardown() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
