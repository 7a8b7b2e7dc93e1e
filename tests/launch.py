"""Launch the real trainer from tests: the `deepspeed` launcher (or torchrun / plain python), CPU, gloo.

    res = run_trainer(tiny_args(small_tokenizer, small_shards, tmp_path / "run", steps=6), ranks=2)
    assert res.returncode == 0, res.output
    losses = res.losses()               # {step: loss} from metrics.jsonl

Every launch gets a free rendezvous port, its own process group (so a `kill_job` fault or a timeout
kill reaches the launcher and every rank, and nothing is left behind), and the venv's environment
(`roberta_ds.quickstart.pipeline.launcher_env`: venv bin first on PATH, one JIT extension cache, CPU
accelerator without a GPU).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from roberta_ds.checkpoint import commit as ckpt
from roberta_ds.quickstart.pipeline import deepspeed_launcher, launcher_env

REPO = Path(__file__).resolve().parent.parent
DS_CONFIGS = REPO / "ds_configs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_args(tokenizer: Path, shards: Path, out: Path, *, steps: int, ds_config: str = "zero2_bf16",
              global_batch: int = 8, micro: int = 2, seq: int = 64, valid: bool = False,
              extra: list[str] = ()) -> list[str]:
    """Trainer arguments for the tiny model on the test shards (train/ and valid/ under `shards`)."""
    args = [
        "--ds-config", str(DS_CONFIGS / f"{ds_config}.json"),
        "--ds-set", f"train_batch_size={global_batch}", "--ds-set", f"train_micro_batch_size_per_gpu={micro}",
        "--set", "model.preset=tiny", "--set", f"model.max_positions={seq + 2}",
        "--set", f"tokenizer={tokenizer}", "--set", f"data.train={shards / 'train'}",
        "--set", f"data.max_seq_len={seq}", "--set", "data.num_workers=0",
        "--set", f"output_dir={out}", "--set", f"max_steps={steps}",
        "--set", f"optim.total_steps={max(steps, 20)}", "--set", "optim.warmup_steps=2",
        "--set", "log_interval=1", "--set", f"save_interval={steps}", "--set", "tensorboard=false",
    ]
    if valid:
        args += ["--set", f"data.valid={shards / 'valid'}", "--set", "eval_batches=2"]
    return args + list(extra)


@dataclass
class Result:
    returncode: int
    output: str
    out_dir: Path | None
    seconds: float

    def metrics(self) -> list[dict]:
        path = self.out_dir / "metrics.jsonl" if self.out_dir else None
        if not path or not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def losses(self) -> dict[int, float]:
        """Per-step training loss (the last record of each step: a resumed run appends to the same file)."""
        return {r["step"]: r["loss"] for r in self.metrics() if "loss" in r}


def _out_dir(args: list[str]) -> Path | None:
    for i, a in enumerate(args):
        if a == "--set" and args[i + 1].startswith("output_dir="):
            return Path(args[i + 1].split("=", 1)[1])
        if a == "--output-dir":
            return Path(args[i + 1])
    return None


def trainer_command(args: list[str], *, ranks: int, launcher: str = "deepspeed", port: int | None = None) -> list[str]:
    port = port or free_port()
    bin_dir = Path(sys.executable).parent
    if launcher == "deepspeed":
        return [*deepspeed_launcher(), "--num_gpus", str(ranks), "--master_port", str(port),
                "--module", "roberta_ds.train", *args]
    if launcher == "torchrun":
        return [str(bin_dir / "torchrun"), "--nproc-per-node", str(ranks), "--master-port", str(port),
                "-m", "roberta_ds.train", *args]
    if launcher == "python":
        return [sys.executable, "-m", "roberta_ds.train", *args]
    raise ValueError(launcher)


def run_trainer(args: list[str], *, ranks: int = 2, launcher: str = "deepspeed", env: dict[str, str] | None = None,
                timeout: float = 300, port: int | None = None) -> Result:
    """Run the trainer to completion (or kill its whole process group at `timeout`)."""
    cmd = trainer_command(args, ranks=ranks, launcher=launcher, port=port)
    returncode, output, seconds = _run(cmd, env, timeout)
    return Result(returncode, output, _out_dir(args), seconds)


def _run(cmd: list[str], env: dict[str, str] | None, timeout: float) -> tuple[int, str, float]:
    """(exit code, output, seconds) of `cmd` in its own process group, killed whole at `timeout`."""
    full_env = launcher_env()
    full_env.update(env or {})
    full_env.setdefault("PYTHONPATH", str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=str(REPO))
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        output, _ = proc.communicate()
        output += f"\n[tests/launch.py] killed after {timeout}s"
    finally:
        kill_group(proc.pid)  # nothing of this job survives the test (ranks the launcher left behind)
    return proc.returncode, output, time.perf_counter() - t0


def run_jobs(jobs: dict[str, list[str]], work: Path, *, ranks: int, timeout: float = 300) -> tuple[Result, dict]:
    """Several trainings (name -> trainer arguments) one after another in ONE torchrun launch of
    `ranks` processes (tests/ds_scripts/train_batch.py): (the launch, its record: name -> {"exit",
    "start_step", "samples": {step: sorted global sample indices}}). One launch instead of one per
    training saves ~10 s of imports and process-group start each."""
    work.mkdir(parents=True, exist_ok=True)
    jobs_file, record_file = work / "jobs.json", work / "record.json"
    jobs_file.write_text(json.dumps([{"name": k, "args": v} for k, v in jobs.items()]))
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", str(ranks), "--master-port",
           str(free_port()), str(REPO / "tests" / "ds_scripts" / "train_batch.py"), str(jobs_file), str(record_file)]
    returncode, output, seconds = _run(cmd, None, timeout)
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    return Result(returncode, output, None, seconds), record


def rolled_back_copy(src: Path, dst: Path, step: int) -> Path:
    """`src` as it was when the run stopped right after committing `step`: later checkpoints gone,
    `latest` naming `step`, metrics.jsonl cut after `step` (a resumed run appends to it)."""
    shutil.copytree(src, dst)
    ckpt_dir = dst / "checkpoints"
    for d in ckpt_dir.iterdir():
        s = ckpt.step_of(d.name)
        if d.is_dir() and (s is None or s > step):
            shutil.rmtree(d)
    (ckpt_dir / ckpt.POINTER_NAME).write_text(ckpt.tag_for(step))
    lines = (dst / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    (dst / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    return dst


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
