"""Run several short trainings, one after another, in ONE launch (one process group), recording which
global samples each optimizer step consumed.

    torchrun --nproc-per-node 2 tests/ds_scripts/train_batch.py JOBS.json RECORD.json

JOBS.json: [{"name": str, "args": [trainer arguments, as `roberta-ds train` takes them]}, ...].
Each job goes through the trainer's own path (`train.setup`, then `loop.Trainer.run`): resume
choice, universal conversion and loading included. A launch of 2 ranks costs ~10 s of imports and
process-group start on 2 CPU cores; sharing it between the many trainings of a test is what keeps
those tests cheap. Under torchrun the rendezvous store belongs to the agent, so the trainer's
port check (it refuses a port that is in use) does not trip on the second job's setup.

RECORD.json (rank 0, written after every job): {name: {"exit": code, "start_step": s,
"samples": {step: sorted global sample indices of that optimizer step, over all ranks},
"cpu_offload": whether the engine's ZeRO optimizer keeps its states on the CPU}}. The
indices are the loader's `sample_index`: positions in the world-size-independent global order.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from roberta_ds.engine import setup as train
from roberta_ds.engine.trainer import Trainer
from roberta_ds.launch import dist
from roberta_ds.launch.faults import Faults
from roberta_ds.launch.run_lock import release_held
from roberta_ds.launch.signals import StopFlag


def _recording(loader, seen: list[list[int]]):
    """The trainer's loader, noting each micro-batch's sample indices as the trainer takes it."""
    try:
        for batch in loader:
            seen.append(batch["sample_index"].tolist())
            yield batch
    finally:
        loader.close()


def run_job(args: list[str], stop: StopFlag) -> dict:
    rt = train.setup(train.parse_args(args), stop)
    start, accum = rt.step, rt.plan.grad_accum
    trainer = Trainer(rt, stop, Faults(rank=rt.env.rank))
    seen: list[list[int]] = []
    trainer.loader = _recording(trainer.loader, seen)
    code = trainer.run()
    release_held()  # this job's output directory is free for the next launch
    per_step: dict[int, list[int]] = {}
    for i, ids in enumerate(seen):
        per_step.setdefault(start + i // accum, []).extend(ids)
    gathered: list[dict[int, list[int]]] = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
    torch.distributed.all_gather_object(gathered, per_step)
    samples = {step: sorted(i for rank in gathered for i in rank.get(step, [])) for step in per_step}
    # What the engine's ZeRO optimizer really did (not what the config asked): optimizer on the CPU?
    offload = bool(getattr(rt.engine.optimizer, "cpu_offload", False))
    return {"exit": code, "start_step": start, "samples": samples, "cpu_offload": offload}


def main(jobs_path: str, record_path: str) -> None:
    jobs = json.loads(Path(jobs_path).read_text())
    stop = StopFlag.install()
    record: dict[str, dict] = {}
    for job in jobs:
        record[job["name"]] = run_job(job["args"], stop)
        if torch.distributed.get_rank() == 0:
            tmp = Path(f"{record_path}.tmp")
            tmp.write_text(json.dumps(record, indent=1))
            os.replace(tmp, record_path)
        dist.print0(f"[train_batch] job {job['name']} done (exit {record[job['name']]['exit']})")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as train._exit_after_run: skip C++ static destructors (a CPU run once aborted there)


if __name__ == "__main__":
    main(*sys.argv[1:])
