"""The stored learning curve (tests/golden/learning_curve*.json): its run, its comparison, its regeneration.

A short training run on a frozen slice of the built-in corpus: the tiny model, fixed seeds, 2 CPU
ranks through the `deepspeed` launcher, fp32, ZeRO-2, dropout on; every step's training loss and the
validation loss and MLM accuracy every 10 steps. test_learning_curve.py reruns it and compares with
the stored curve; a change that moves the curve fails there and the golden file is regenerated on
purpose, in the same commit, with the reason:

    .venv/bin/python tests/learning_curve.py --reason "why the curve moved"

Inputs are frozen so that the curve depends on the trainer alone: `learning_curve_corpus.jsonl.gz`
(the first documents of the built-in corpus as CPython 3.11 extracts it, docstrings and comments;
Python Software Foundation License) and `learning_curve_tokenizer.json` (a 1,024-id BPE trained on
it); the test builds shards from them, so another Python or another `tokenizers` training does not
move the curve (a change to shard building or encoding still can).

The tolerance comes from run-to-run variation across processors: the regeneration reruns the curve
with the CPU kernels a different processor would pick (ATen's AVX2 and scalar code paths instead of
AVX-512, oneDNN and MKL held to AVX2, 2 OpenMP threads instead of 1) and stores the largest
deviation of each quantity from the reference run (a rerun of the reference itself is bitwise equal).
The tolerance is TOLERANCE_FACTOR (100) times that deviation, but at least a floor: a real processor
can differ in more kernels at once than one switch here, and the differences compound over steps,
so two orders of magnitude of headroom; the accuracy, whose deviation is 0 here, gets about one of
its ~880 masked positions. The regeneration also reruns small deliberate changes (MUTATIONS: LR +1%,
one more warmup step, weight decay doubled, ...) and stores how far each moves the curve, so the
golden file shows what the tolerance still catches. Everything is in the golden file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # run as a script: launch.py beside it
sys.path.insert(1, str(REPO))

from launch import run_trainer  # noqa: E402

GOLDEN = REPO / "tests" / "golden"
CURVE = GOLDEN / "learning_curve.json"
CORPUS = GOLDEN / "learning_curve_corpus.jsonl.gz"
TOKENIZER = GOLDEN / "learning_curve_tokenizer.json"

STEPS = 60
EVAL_INTERVAL = 15
CORPUS_CHARS = 160_000
"""Text frozen for the run: ~50K tokens at 1,024 ids (the run reads 60 x 64 x 32 slots, about 2 epochs)."""
VOCAB = 1024
TOLERANCE_FACTOR = 100.0
FLOORS = {"loss": 1e-5, "valid_loss": 1e-5, "valid_acc": 2e-3}
"""Least tolerance per quantity: ~20 float32 ulps of a loss near 6; for the accuracy 1 of the ~880
masked validation positions (a last-bit difference can flip one argmax)."""
MUTATIONS = ("optim.lr=0.00303", "optim.warmup_steps=11", "optim.weight_decay=0.02", "optim.eps=1e-8",
             "model.dropout=0.11", "data.random_token_prob=0.11")
"""Small deliberate changes the regeneration measures against the tolerance (`--set` overrides)."""
QUANTITIES = ("loss", "valid_loss", "valid_acc")

VARIANTS: dict[str, dict[str, str]] = {
    "reference": {},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten-scalar": {"ATEN_CPU_CAPABILITY": "default"},
    "onednn-mkl-avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "omp-2-threads": {"OMP_NUM_THREADS": "2"},
}
"""Environments that make this machine compute like another processor (or thread count) would."""


def trainer_args(tokenizer: Path, shards: Path, out: Path) -> list[str]:
    """The golden run's trainer arguments (everything that defines the curve is here)."""
    return [
        "--ds-config", str(REPO / "ds_configs" / "zero2_bf16.json"), "--ds-set", "bf16.enabled=false",
        "--ds-set", "gradient_clipping=1.0",  # recorded with it (the shipped configs' value until 0.0)
        "--ds-set", "train_batch_size=64", "--ds-set", "train_micro_batch_size_per_gpu=16",
        "--set", "model.preset=tiny", "--set", "model.max_positions=34",
        "--set", f"tokenizer={tokenizer}", "--set", f"data.train={shards / 'train'}",
        "--set", f"data.valid={shards / 'valid'}", "--set", "data.max_seq_len=32", "--set", "data.num_workers=0",
        "--set", "seed=7", "--set", "data.seed=7",
        "--set", "optim.lr=3e-3", "--set", "optim.warmup_steps=10", "--set", f"optim.total_steps={STEPS}",
        "--set", f"output_dir={out}", "--set", f"max_steps={STEPS}", "--set", "log_interval=1",
        "--set", f"eval_interval={EVAL_INTERVAL}", "--set", "eval_batches=8", "--set", f"save_interval={STEPS}",
        "--set", "tensorboard=false",
    ]


def prepare_inputs(work: Path) -> tuple[Path, Path]:
    """The frozen tokenizer in a directory, and shards built from the frozen corpus. Returns (tok, shards)."""
    from data_tools.build_shards import build_shards

    tok = work / "tokenizer"
    tok.mkdir(parents=True)
    shutil.copyfile(TOKENIZER, tok / "tokenizer.json")
    corpus = work / "corpus"
    corpus.mkdir()
    shutil.copyfile(CORPUS, corpus / CORPUS.name)
    build_shards([corpus], tok, work / "shards", workers=1, valid_fraction=0.1, seed=7)
    return tok, work / "shards"


def run_curve(work: Path, env: dict[str, str] | None = None, timeout: float = 600,
              extra: list[str] = ()) -> dict[str, list]:
    """Train the golden run under `env` (with `extra` trainer arguments); returns {quantity: [[step, value], ...]}."""
    tok, shards = prepare_inputs(work)
    res = run_trainer(trainer_args(tok, shards, work / "run") + list(extra), ranks=2, env=env, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"golden run failed (exit {res.returncode}):\n{res.output[-4000:]}")
    curve: dict[str, list] = {q: [] for q in QUANTITIES}
    for r in res.metrics():
        for q in QUANTITIES:
            if q in r:
                curve[q].append([r["step"], r[q]])
    return curve


def deviations(curve: dict[str, list], reference: dict[str, list]) -> dict[str, float]:
    """Largest |difference| per quantity between two curves (which must cover the same steps)."""
    out = {}
    for q in QUANTITIES:
        steps_a, steps_b = [s for s, _ in curve[q]], [s for s, _ in reference[q]]
        if steps_a != steps_b:
            raise AssertionError(f"{q}: logged at steps {steps_a}, the golden curve at {steps_b}")
        out[q] = max(abs(a - b) for (_, a), (_, b) in zip(curve[q], reference[q]))
    return out


def regenerate(reason: str) -> dict:
    """Rerun every variant, derive the tolerance, write CURVE (the frozen inputs are kept)."""
    import deepspeed
    import torch

    curves = {}
    for name, env in VARIANTS.items():
        with tempfile.TemporaryDirectory() as tmp:
            curves[name] = run_curve(Path(tmp), env)
        print(f"{name}: done", flush=True)
    ref = curves["reference"]
    devs = {name: deviations(c, ref) for name, c in curves.items() if name != "reference"}
    tolerance = {q: max(FLOORS[q], TOLERANCE_FACTOR * max(d[q] for d in devs.values())) for q in QUANTITIES}
    caught = {}
    for change in MUTATIONS:
        with tempfile.TemporaryDirectory() as tmp:
            d = deviations(run_curve(Path(tmp), extra=["--set", change]), ref)
        caught[change] = {"max_abs_deviation": d, "fails_the_test": any(d[q] > tolerance[q] for q in QUANTITIES)}
        print(f"{change}: {caught[change]}", flush=True)
    golden = {
        "what": "tests/learning_curve.py: the golden run's losses and accuracies; see its docstring",
        "reason": reason,
        "recorded_with": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                          "python": platform.python_version(), "cpu": _cpu_name(),
                          "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "curve": ref,
        "variants": {name: {"env": VARIANTS[name], "max_abs_deviation": d} for name, d in devs.items()},
        "tolerance": tolerance,
        "tolerance_rule": f"max(floor {FLOORS}, {TOLERANCE_FACTOR:g} x the largest deviation of any variant)",
        "deliberate_changes": caught,
    }
    CURVE.write_text(json.dumps(golden, indent=1) + "\n")
    return golden


def freeze_inputs() -> None:
    """Write the frozen corpus slice and tokenizer (only when they are missing or --refreeze)."""
    from data_tools.builtin_corpus import builtin_documents
    from data_tools.train_tokenizer import train_tokenizer

    docs, size = [], 0
    for d in builtin_documents(40, comments=True):
        if size >= CORPUS_CHARS:
            break
        docs.append(d)
        size += len(d)
    data = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
    CORPUS.write_bytes(gzip.compress(data, mtime=0))
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer([CORPUS], Path(tmp), vocab_size=VOCAB)
        shutil.copyfile(Path(tmp) / "tokenizer.json", TOKENIZER)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description="Regenerate tests/golden/learning_curve.json (on purpose).")
    p.add_argument("--reason", required=True, help="why the curve moved (stored in the golden file)")
    p.add_argument("--refreeze", action="store_true", help="also rewrite the frozen corpus slice and tokenizer")
    args = p.parse_args()
    if args.refreeze or not CORPUS.is_file() or not TOKENIZER.is_file():
        freeze_inputs()
    golden = regenerate(args.reason)
    print(json.dumps({"tolerance": golden["tolerance"], "variants": golden["variants"]}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(REPO))
    sys.exit(main())
