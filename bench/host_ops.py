"""Host work DeepSpeed adds per micro-batch and per optimizer step, by ZeRO stage, against ZeRO-2.

    python bench/host_ops.py                       # ZeRO-1, 2, 3; table last (about 40 s on 2 cores)
    python bench/host_ops.py --stages 1 2 --layers 24

Why: on the H100 our training step was host-bound at micro 32 (313.8K tokens/s against 455.1K at
micro 64, bench/HISTORY.md): the GPU waited for Python. The host work that grows with accumulation is
DeepSpeed's per-parameter gradient bookkeeping at every micro-batch. This counts it on any machine,
exactly: every aten op dispatched (TorchDispatchMode), so the figures do not depend on a noisy CPU.

Each stage runs in its own process through the real training path (`train.setup()` +
`loop.Trainer.train_step()`, bench/ours_case.py): a model with roberta-base's structure (12 layers,
the same parameter tensors, so the same number of gradient hooks) at a tiny width, eager, bf16,
micro 2 x accumulation 8. Per micro-batch: ops between consecutive `engine.step()` calls, minus
the model's own forward+backward ops (the same model built without DeepSpeed, same batch). Per
optimizer step: the last micro-batch's extra over a middle one (DeepSpeed's reduction, clipping,
optimizer and copies) plus the trainer's tail. Wall times are medians over steps and only
indicative on a CPU. On a GPU with the compiled model the model's own launches shrink to a few
graph launches while DeepSpeed's stay as counted here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for p in (str(REPO), str(REPO / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)


def measure(stage: int, layers: int, accum: int, steps: int, work: Path, ds_sets: tuple[str, ...] = ()
            ) -> dict[str, Any]:
    """One stage in this process: op counts and times per micro-batch and per optimizer step."""
    import torch
    from cases import Case
    from ours_case import close_trainer, start_trainer
    from synthetic_data import prepare_data
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCount(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0
            self.by_op: Counter[str] = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            self.by_op[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    tok, train = prepare_data(work, 8000, 300_000)
    c = Case(f"zero{stage}", "ours", "tiny", 64, 2, accum=accum, compile=False, zero=stage, ds_sets=ds_sets,
             overrides=(("num_layers", layers), ("vocab_size", 8000)))
    rt, trainer = start_trainer(c, tok, train, work / f"run{stage}", 0)
    try:
        engine = rt.engine
        trainer.train_step()  # warm-up: buffers, first-step setup
        batch = next(trainer.loader)
        from roberta_ds.model.model import RobertaMLM

        model = RobertaMLM(rt.cfg.model).to(torch.bfloat16)  # same structure, no DeepSpeed hooks
        model.train()
        with OpCount() as m:
            model(batch["input_ids"], batch["mlm_positions"], batch["mlm_labels"]).backward()
        model_ops = m.n
        del model

        marks: list[tuple[int, float]] = []
        counter = OpCount()
        real_step = engine.step

        def marked_step(*a, **k):  # records the op count and clock after each micro-batch
            out = real_step(*a, **k)
            marks.append((counter.n, time.perf_counter()))
            return out

        engine.step = marked_step
        per_micro, boundary, micro_s, step_s, tails = [], [], [], [], []
        try:
            for _ in range(steps):
                marks.clear()
                with counter:
                    start = (counter.n, time.perf_counter())
                    trainer.train_step()
                    end = (counter.n, time.perf_counter())
                pts = [start, *marks]
                ops = [b[0] - a[0] for a, b in pairwise(pts)]
                secs = [b[1] - a[1] for a, b in pairwise(pts)]
                per_micro += ops[1:-1]  # middle micro-batches: no boundary work (the first holds the LR set)
                micro_s += secs[1:-1]
                boundary.append(ops[-1] - statistics.median(ops[1:-1]))
                tails.append(end[0] - marks[-1][0])
                step_s.append(end[1] - start[1])
        finally:
            engine.step = real_step
        if len(set(per_micro)) != 1:
            raise RuntimeError(
                f"zero{stage}: op counts differ between middle micro-batches: {sorted(set(per_micro))}")
        top = counter.by_op.most_common(8)
        return {
            "stage": stage,
            "ds_sets": list(ds_sets),
            "optimizer": type(engine.optimizer).__name__,
            "params": sum(1 for p in engine.module.parameters() if p.requires_grad),
            "accum": accum,
            "model_ops": model_ops,
            "ds_ops_per_micro": per_micro[0] - model_ops,
            "ops_per_step_extra": statistics.median(boundary) + statistics.median(tails),
            "ms_per_micro": 1e3 * statistics.median(micro_s),
            "ms_per_step": 1e3 * statistics.median(step_s),
            "top_ops": top,
        }
    finally:
        close_trainer(trainer)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def ds_ops_per_step(r: dict[str, Any]) -> float:
    """DeepSpeed's host ops per optimizer step: per-micro-batch work x accumulation + the step's own."""
    return r["ds_ops_per_micro"] * r["accum"] + r["ops_per_step_extra"]


def format_table(rows: list[dict[str, Any]], baseline: int = 2) -> str:
    base = next((r for r in rows if r["stage"] == baseline), None)
    first = rows[0]
    sets = "; --ds-set " + " ".join(first["ds_sets"]) if first.get("ds_sets") else ""
    title = (f"== host ops DeepSpeed adds (aten ops dispatched; model: {first['params']} parameter tensors, "
             f"eager, {first['model_ops']} ops per micro-batch fwd+bwd){sets}")
    per_step = f"DS ops/step (A={first['accum']})"
    header = (f"{'stage':<7} {'optimizer':<30} {'DS ops/micro':>13} {'step extra':>11} {per_step:>19} "
              f"{'vs ZeRO-2':>10} {'ms/micro':>9} {'ms/step':>8}")
    lines = [title, header]
    for r in rows:
        less = f"{ds_ops_per_step(base) / ds_ops_per_step(r):.2f}x less" if base else ""
        ratio = "baseline" if base is None or r is base else less
        lines.append(
            f"ZeRO-{r['stage']:<2} {r['optimizer']:<30} {r['ds_ops_per_micro']:>13,} "
            f"{r['ops_per_step_extra']:>11,.0f} {ds_ops_per_step(r):>19,.0f} {ratio:>10} "
            f"{r['ms_per_micro']:>9.1f} {r['ms_per_step']:>8.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=(1, 2, 3))
    ap.add_argument("--layers", type=int, default=12, help="encoder layers (12: roberta-base's tensors)")
    ap.add_argument("--accum", type=int, default=8, help="micro-batches per optimizer step (>= 3)")
    ap.add_argument("--steps", type=int, default=3, help="measured optimizer steps per stage")
    ap.add_argument("--work", type=Path, default=None, help="data and run directory (default: a temp dir)")
    ap.add_argument("--ds-set", action="append", default=[], metavar="KEY=VALUE",
                    help="DeepSpeed config override for every stage, "
                         "e.g. zero_optimization.overlap_comm=false")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--_stage", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.accum < 3:
        ap.error("--accum: at least 3 (a first, a middle and a last micro-batch)")
    work = a.work or Path(tempfile.mkdtemp(prefix="host_ops_"))
    if a._stage is not None:
        row = measure(a._stage, a.layers, a.accum, a.steps, work, tuple(a.ds_set))
        print("ROW " + json.dumps(row), flush=True)
        return 0
    from roberta_ds.quickstart.pipeline import launcher_env

    rows = []
    for stage in a.stages:  # one process each: a fresh engine and process group
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_stage", str(stage),
               "--layers", str(a.layers), "--accum", str(a.accum), "--steps", str(a.steps),
               "--work", str(work),
               *(x for kv in a.ds_set for x in ("--ds-set", kv))]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=launcher_env(), check=False)
        lines = proc.stdout.splitlines()
        row = next((json.loads(line[4:]) for line in lines if line.startswith("ROW ")), None)
        if proc.returncode != 0 or row is None:
            print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
            print(f"host_ops: ZeRO-{stage} failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        rows.append(row)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
