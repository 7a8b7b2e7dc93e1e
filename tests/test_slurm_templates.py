"""The slurm/ templates, run as they ship on a real one-node SLURM cluster, and the glue they call.

Without a cluster (always): every template passes `bash -n` and `shellcheck`; the array
preprocessing tool (data_tools.build_shards_parallel) reproduces build-shards byte for byte; the
discovery preflight (`python -m roberta_ds.dist`) prints each rank or fails.

On the cluster (`slurm` marker; root + apt-get, as in CI): the real templates, with only their
size variables and knobs changed (`sbatch -N 1 --ntasks-per-node=2 --gpus-per-node=0 -c 1`, knobs
in the environment), train the tiny model on CPU; a signalled run saves, requeues itself, resumes
and matches an uninterrupted run loss for loss; the requeue decision follows the exit code only;
the preprocessing array + merge equals the single-machine shards; export-hf runs chained after
training; the trainer discovers its world through mpi4py under `srun --mpi=pmix` and `mpirun`; the
`deepspeed`-launcher template runs from its generated hostfile; a requeued job whose killed ranks
left the run lock takes it over at once.

The jobs of README.md's and slurm/README.md's SLURM blocks are submitted by running those lines
with bash in a working directory laid out as they expect (`template_workdir`), through an `sbatch`
that adds the size flags (tests/readme_blocks.py: `readme_lines_on_cluster`); tests/test_readme.py
lists which test runs which line.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster.slurm import REPO, JobResult, SlurmCluster, clean_env, slurm  # noqa: F401  (slurm: session fixture)
from conftest import SMALL_SHARD_TOKENS, SMALL_VALID_FRACTION
from readme_blocks import make_workdir, readme_block, run_bash, sbatch_shim, scaled, scaled_ds_configs

from data_tools import build_shards_parallel as bsp
from data_tools.build_shards import build_shards
from roberta_ds.errors import UserError
from roberta_ds.launch import dist
from roberta_ds.launch.dist import DistEnv

SLURM_DIR = REPO / "slurm"
TEMPLATES = sorted(SLURM_DIR.glob("*.sbatch"))
SHELL_FILES = [*TEMPLATES, SLURM_DIR / "common.sh"]
VENV = Path(sys.prefix)
# The size overrides every training job gets: one node, two CPU "GPUs" (ranks), no GPUs.
SIZE_2_RANKS = ["-N", "1", "--ntasks-per-node=2", "--gpus-per-node=0", "-c", "1"]
STEPS = 10
"""Steps of the tiny runs compared loss for loss (the straight run and the preempted one)."""


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- shell quality ----------------------------------------------------------------------------


def test_templates_exist():
    names = {p.name for p in TEMPLATES}
    assert {"pretrain.sbatch", "pretrain_deepspeed.sbatch", "preprocess.sbatch", "export_hf.sbatch"} <= names
    assert (SLURM_DIR / "README.md").is_file()


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_bash_syntax(path):
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def _shellcheck() -> str:
    """Path of shellcheck, installing it with apt-get as root (like the SLURM packages), or skip."""
    found = shutil.which("shellcheck")
    if found:
        return found
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("shellcheck is not installed (and installing it needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q", "--no-install-recommends",
               "shellcheck"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-q"], env=env, capture_output=True,
                       check=False)
        proc = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            pytest.skip(f"shellcheck could not be installed: {proc.stderr.strip()[-300:]}")
    return shutil.which("shellcheck") or pytest.skip("shellcheck installed but not on PATH")


def test_shellcheck_clean():
    # -x follows `source common.sh` (the templates say where with a source directive).
    proc = subprocess.run([_shellcheck(), "-x", "-P", "SCRIPTDIR", *map(str, SHELL_FILES)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- data_tools.build_shards_parallel (the preprocess array's tool) ---------------------------


def test_task_ranges_are_contiguous_balanced_and_total():
    assert bsp.task_ranges([10, 10, 10, 10], 2) == [(0, 2), (2, 4)]
    assert bsp.task_ranges([26, 27, 25, 22], 3) == [(0, 1), (1, 3), (3, 4)]
    assert bsp.task_ranges([5, 5], 4) == [(0, 0), (0, 1), (1, 1), (1, 2)]     # more tasks than files
    assert bsp.task_ranges([100, 1, 1, 1], 2) == [(0, 1), (1, 4)]               # one big file
    assert bsp.task_ranges([], 3) == [(0, 0)] * 3
    for sizes, n in (([3, 1, 4, 1, 5, 9, 2, 6], 3), ([1] * 17, 5), ([7], 1)):
        ranges = bsp.task_ranges(sizes, n)
        assert len(ranges) == n and ranges[0][0] == 0 and ranges[-1][1] == len(sizes)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))        # contiguous, in order
    with pytest.raises(UserError, match="--tasks"):
        bsp.task_ranges([1], 0)


def test_parallel_build_is_byte_identical_to_build_shards(tmp_path, builtin_corpus, small_tokenizer,
                                                          small_shards, monkeypatch):
    # small_shards was built by build_shards from the same corpus, tokenizer and settings.
    opts = bsp.BuildOptions(valid_fraction=SMALL_VALID_FRACTION, shard_tokens=SMALL_SHARD_TOKENS)
    out = tmp_path / "out"
    kw = {"options": opts}
    with pytest.raises(UserError, match=r"3 of 3 tasks have not finished \(tasks 0,1,2\).*--array=0,1,2"):
        bsp.merge_parts([builtin_corpus], small_tokenizer, out, tasks=3, **kw)
    records = [bsp.build_part([builtin_corpus], small_tokenizer, out, task=t, tasks=3, **kw) for t in (2, 0, 1)]
    assert sorted(len(r["files"]) for r in records) == [1, 1, 2] and not any(r["empty"] for r in records)
    # A rerun of a finished task is a no-op; a part made for another task count is refused.
    assert bsp.build_part([builtin_corpus], small_tokenizer, out, task=1, tasks=3, **kw) == records[2]
    with pytest.raises(UserError, match="task count"):
        bsp.merge_parts([builtin_corpus], small_tokenizer, out, tasks=2, **kw)

    # Copy in small pieces (many whole-document chunks per shard), keep the parts for the resume below.
    monkeypatch.setattr(bsp, "COPY_TOKENS", 997)
    bsp.merge_parts([builtin_corpus], small_tokenizer, out, tasks=3, keep_parts=True, **kw)
    want = tree_bytes(small_shards)
    assert {k: v for k, v in tree_bytes(out).items() if not k.startswith(".parts")} == want

    # An interrupted merge (last train shard and the manifests gone) resumes to the same bytes.
    for name in ("train/manifest.json", "valid/manifest.json", "train/shard-00002.bin", "train/shard-00002.idx"):
        (out / name).unlink()
    monkeypatch.setattr(bsp, "COPY_TOKENS", 1 << 24)
    bsp.merge_parts([builtin_corpus], small_tokenizer, out, tasks=3, **kw)
    assert tree_bytes(out) == want                          # .parts removed, nothing else differs


def test_blank_and_empty_parts_still_add_up(tmp_path, builtin_corpus, small_tokenizer):
    # Task 0 gets a file of blank documents only, task 2 no file at all (more tasks than files).
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "   "}\n' * 50)
    inputs = [blank, min(builtin_corpus.iterdir())]
    assert bsp.task_ranges([p.stat().st_size for p in inputs], 3) == [(0, 1), (1, 2), (2, 2)]
    opts = bsp.BuildOptions(valid_fraction=SMALL_VALID_FRACTION, shard_tokens=SMALL_SHARD_TOKENS)
    out = tmp_path / "out"
    recs = [bsp.build_part(inputs, small_tokenizer, out, task=t, tasks=3, options=opts) for t in range(3)]
    assert [(r["empty"], r["documents_skipped_empty"], len(r["files"])) for r in recs] == [
        (True, 50, 1), (False, 0, 1), (True, 0, 0)]
    bsp.merge_parts(inputs, small_tokenizer, out, tasks=3, options=opts)
    build_shards(inputs, small_tokenizer, tmp_path / "single", workers=1, valid_fraction=SMALL_VALID_FRACTION,
                 shard_tokens=SMALL_SHARD_TOKENS)
    assert tree_bytes(out) == tree_bytes(tmp_path / "single")   # documents_skipped_empty: 50 in both


# ---- the discovery preflight (python -m roberta_ds.dist) ----------------------------------------


def _dist_main(environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**clean_env(), "PYTHONPATH": str(REPO), **environ}
    return subprocess.run([sys.executable, "-m", "roberta_ds.dist"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_dist_preflight_prints_each_rank_or_fails():
    step = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1",
            "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "vm", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_NTASKS": "2"}
    proc = _dist_main(step)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(rf"\[roberta-ds dist\] \S+: rank 1/2 \(local 1/2\) from slurm; rendezvous "
                        rf"vm:{dist.slurm_port(77, 1)}\n", proc.stdout), proc.stdout
    # The batch shell itself (SLURM_NTASKS=2, no step): a lone process where 2 were promised.
    proc = _dist_main({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"})
    assert proc.returncode == 1 and "without `srun`" in proc.stderr, proc.stderr


def test_log_source_says_when_mpi4py_agreed():
    env = DistEnv(0, 2, 0, 2, "vm", 21234, "slurm", mpi_size=2)
    assert dist.log_source(env) == "rank 0/2 (local 0/2) from slurm, mpi4py world 2; rendezvous vm:21234"
    assert env == DistEnv(0, 2, 0, 2, "vm", 21234, "slurm")          # not part of equality


# ---- on the cluster -----------------------------------------------------------------------------


def job_env(**knobs: str) -> dict[str, str]:
    """Knobs every template job gets: this venv, this checkout, CPU DeepSpeed (+ the given knobs)."""
    env = {"VENV": str(VENV), "ROBERTA_DS_HOME": str(REPO), "PYTHONPATH": str(REPO)}
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
    return {**env, **knobs}


def template_workdir(tmp: Path, tokenizer: Path, shards: Path, *, steps: int = STEPS, **changes) -> Path:
    """A submit directory as the README's SLURM lines expect: my.yaml and my_base.yaml (the tiny model
    on the test shards, lr 6e-4 as slurm/README's EXTRA_ARGS sets it; `changes` added), ds_configs/
    at batch 8 in fp32 (bf16 matmuls are slow on CPU), slurm/ (the templates), corpus/ and tok/."""
    work = tmp / "work"
    work.mkdir(parents=True)
    cfg = {
        "model": {"preset": "tiny", "max_positions": 66},
        "data": {"train": [str(shards / "train")], "max_seq_len": 64, "num_workers": 0},
        "optim": {"total_steps": 20, "warmup_steps": 2, "lr": 6e-4},
        "tokenizer": str(tokenizer), "max_steps": steps, "log_interval": 1, "save_interval": steps,
        "tensorboard": False, "ds_config": "ds_configs/zero2_bf16.json", **changes,
    }
    for name in ("my.yaml", "my_base.yaml"):
        (work / name).write_text(json.dumps(cfg, indent=2))  # JSON is YAML
    scaled_ds_configs(work / "ds_configs", fp32=True)
    (work / "slurm").symlink_to(SLURM_DIR, target_is_directory=True)
    (work / "tok").symlink_to(tokenizer, target_is_directory=True)
    return work


def readme_lines_on_cluster(slurm: SlurmCluster, work: Path, lines: list[tuple[str, list[str]]],
                            knobs: dict[str, str] | None = None) -> list[int]:
    """Run README lines with bash in `work`, each with the sbatch flags given beside it (sizes for the
    one-node cluster; the README's own flags follow and win); returns the submitted job ids in order."""
    log = work / ".submitted"
    log.write_text("")
    sbatch_shim(work / ".bin", log)
    script = "".join(f"export SHIM_ARGS={shlex.quote(' '.join(args))}\n{line}\n" for line, args in lines)
    env = slurm.env(job_env(**(knobs or {})))
    env["PATH"] = f"{work / '.bin'}{os.pathsep}{env['PATH']}"
    proc = run_bash(script, work, env, timeout=120)
    assert proc.returncode == 0, proc.stdout
    return [int(x) for x in log.read_text().split()]


def losses(out: Path) -> dict[int, float]:
    """{step: loss} from metrics.jsonl (the last record per step: a resumed run appends)."""
    path = out / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_completed(slurm: SlurmCluster, res) -> None:
    assert (res.state, res.exit_code) == ("COMPLETED", "0:0"), slurm.describe(res.job_id)


def jobs_output(slurm: SlurmCluster) -> str:
    """--output for README jobs: where `slurm.output(job)` reads a job's log."""
    return f"--output={slurm.jobs_dir}/%j.out"


@pytest.fixture(scope="module")
def straight_run(slurm, small_tokenizer, small_shards, tmp_path_factory):
    """README.md's cluster block, lines 1 and 4: pretrain.sbatch (2 ranks, STEPS steps), then
    export_hf.sbatch chained with afterok on $TRAIN."""
    block = readme_block("cluster-sbatch").lines()
    work = template_workdir(tmp_path_factory.mktemp("pretrain"), small_tokenizer, small_shards)
    out = work / "runs" / "base"
    job, export = readme_lines_on_cluster(slurm, work, [
        (block[0], [*SIZE_2_RANKS, jobs_output(slurm)]),
        (block[3], ["-c", "1", "--kill-on-invalid-dep=yes", jobs_output(slurm)]),
    ])
    state = slurm.wait(job, 400)   # the first CPU run may JIT-build DeepSpeed's comm op
    info = slurm.job_info(job)
    res = JobResult(job, state, info.get("ExitCode", "?"), slurm.output(job))
    return res, out, export


@pytest.mark.slurm
def test_pretrain_template_trains_two_ranks(slurm, straight_run):
    res, out, _ = straight_run
    assert_completed(slurm, res)
    log = res.output
    # The preflight step: one line per rank (srun --label), then the trainer's rank-0 summary.
    assert re.search(r"^0: \[roberta-ds dist\] \S+: rank 0/2 \(local 0/2\) from slurm", log, re.MULTILINE), log
    assert re.search(r"^1: \[roberta-ds dist\] \S+: rank 1/2 \(local 1/2\) from slurm", log, re.MULTILINE), log
    assert re.search(r"^0: \[roberta-ds\] rank 0/2 \(local 0/2\) from slurm; .* x world 2", log, re.MULTILINE), log
    assert "[pretrain.sbatch] training finished (exit 0)" in log
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"


@pytest.mark.slurm
def test_export_hf_template_runs_after_training(slurm, straight_run):
    _, out, export = straight_run
    state = slurm.wait(export, 300)
    assert state == "COMPLETED", slurm.describe(export)
    exported = out / "hf" / f"step_{STEPS:08d}"
    assert (exported / "model.safetensors").is_file() and (exported / "config.json").is_file()
    assert "max abs logit diff" in slurm.output(export), slurm.output(export)


# Step 3 (0-based) takes 6 s longer: a signal sent once 3 steps are done lands inside it, whatever
# the machine's load, so the run saves after step 4 (sleeping changes no number).
SLOW_STEP_3 = "sleep=6@step:step=3"


def signal_after_3_steps(slurm: SlurmCluster, job: int, out: Path) -> None:
    """Wait until the job has done 3 steps (training, not setup), then send what
    `--signal=B:USR1@600` sends before the time limit: USR1 to the batch shell only; wait for the
    job to requeue itself."""
    deadline = time.monotonic() + 300
    while max(losses(out), default=0) < 3:
        assert time.monotonic() < deadline and slurm.job_info(job).get("JobState") in ("PENDING", "RUNNING"), \
            slurm.describe(job)
        time.sleep(0.2)
    slurm.scancel(job, "--batch", "--signal=USR1")
    slurm.wait_requeued(job, restarts=1, timeout=120)


@pytest.mark.slurm
def test_preempted_run_saves_requeues_resumes_and_matches(slurm, straight_run, small_tokenizer, small_shards,
                                                          tmp_path):
    """slurm/README.md's knobs example (EXTRA_ARGS' global batch 8192 -> 8), preempted and requeued."""
    ref_res, ref_out, _ = straight_run
    assert_completed(slurm, ref_res)
    work = template_workdir(tmp_path, small_tokenizer, small_shards)
    out = work / "runs" / "base"
    line = scaled(readme_block("sbatch-knobs").lines()[0], [("train_batch_size=8192", "train_batch_size=8")])
    [job] = readme_lines_on_cluster(slurm, work, [(line, [*SIZE_2_RANKS, jobs_output(slurm)])],
                                    knobs={"ROBERTA_DS_FAULTS": SLOW_STEP_3})
    signal_after_3_steps(slurm, job, out)
    first = slurm.output(job)
    assert "[pretrain.sbatch] got SIGUSR1" in first and "exiting with 75 (requeue me)" in first, first
    saved = int(re.search(r"checkpoint \S+step_(\d+) committed \(signal SIGUSR1\)", first).group(1))
    assert 4 <= saved < STEPS, first
    assert f"requeueing job {job} (restart 1)" in first, first
    # SLURM starts it again once the killed run's credential expires (cred_expire: 10 s on the test
    # cluster, 120 s by default); starting it earlier would fail it ("Job credential revoked").
    assert slurm.wait(job, 300) == "COMPLETED", slurm.describe(job)

    log = slurm.output(job)                                  # --open-mode=append: both runs
    assert f"[pretrain.sbatch] job {job} (restart 1)" in log and f"at step {saved}" in log, log
    assert "training finished (exit 0)" in log
    got, want = losses(out), losses(ref_out)
    assert sorted(got) == list(range(1, STEPS + 1))
    # Exact resume: the steps after the checkpoint equal the uninterrupted run's, bit for bit.
    assert {s: got[s] for s in got if s > saved} == {s: want[s] for s in want if s > saved}


FAKE_PYTHON = """#!/bin/bash
# Stands in for python in the templates: the preflight succeeds, "training" exits with FAKE_RC.
if [ "$2" = roberta_ds.dist ]; then echo "fake preflight task $SLURM_PROCID"; exit 0; fi
echo "fake trainer task $SLURM_PROCID restart ${SLURM_RESTART_COUNT:-0}: $*"
# Rank 1 ends a second after rank 0, as real ranks do one after another (and dies of a SIGTERM
# meanwhile), or never (FAKE_HANG=1: a rank stuck in a collective after another one crashed).
if [ "$SLURM_PROCID" = 1 ]; then
  if [ "${FAKE_HANG:-0}" = 1 ]; then exec sleep 300; fi
  sleep 1
fi
exit "$FAKE_RC"
"""


def fake_trainer_job(slurm: SlurmCluster, tmp: Path, name: str, **knobs: str) -> int:
    fake = tmp / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = job_env(PYTHON=str(fake), VENV="", OUTPUT_DIR=str(tmp / "run"), **knobs)
    return slurm.sbatch(SLURM_DIR / "pretrain.sbatch", env=env, args=SIZE_2_RANKS, name=name, cwd=tmp)


@pytest.mark.slurm
@pytest.mark.parametrize("code, requeued", [(0, False), (1, False), (4, False), (75, True)])
def test_requeue_only_when_the_trainer_asks(slurm, tmp_path, code, requeued):
    job = fake_trainer_job(slurm, tmp_path, f"rc{code}", FAKE_RC=str(code))
    if requeued:
        # Both ranks' 75 reach the script although rank 1 exits a second later (no kill-on-bad-exit).
        slurm.wait_requeued(job, restarts=1, timeout=60)
        assert f"requeueing job {job} (restart 1)" in slurm.output(job), slurm.describe(job)
        slurm.scancel(job)
        return
    state = slurm.wait(job, 60)
    info = slurm.job_info(job)
    assert info.get("Restarts") == "0", slurm.describe(job)
    if code == 0:
        assert state == "COMPLETED", slurm.describe(job)
    else:
        assert (state, info.get("ExitCode")) == ("FAILED", f"{code}:0"), slurm.describe(job)
        assert f"failed with exit code {code}; not requeued" in slurm.output(job)


@pytest.mark.slurm
def test_crashed_rank_ends_the_job_after_exit_wait(slurm, tmp_path):
    # Rank 0 fails, rank 1 hangs: srun stops it EXIT_WAIT s later; the job fails, no requeue.
    job = fake_trainer_job(slurm, tmp_path, "hang", FAKE_RC="1", FAKE_HANG="1", EXIT_WAIT="3")
    assert slurm.wait(job, 60) == "FAILED", slurm.describe(job)
    assert slurm.job_info(job).get("Restarts") == "0"
    assert "not requeued" in slurm.output(job), slurm.describe(job)


@pytest.mark.slurm
def test_requeue_limit(slurm, tmp_path):
    job = fake_trainer_job(slurm, tmp_path, "limit", FAKE_RC="75", MAX_REQUEUES="0")
    assert slurm.wait(job, 60) == "FAILED", slurm.describe(job)
    assert slurm.job_info(job).get("ExitCode") == "75:0"
    assert "not requeued: already requeued 0 times (MAX_REQUEUES=0)" in slurm.output(job)


@pytest.mark.slurm
def test_preprocess_array_and_merge_equal_build_shards(slurm, tmp_path, builtin_corpus, small_tokenizer,
                                                        small_shards):
    """The preprocessing line of README.md's cluster block and of slurm/README.md's chaining block (the
    same line, run once), as an array of 3 tasks."""
    line = readme_block("chaining").lines()[2].split("#")[0].strip()
    assert line == readme_block("cluster-sbatch").lines()[2].split("#")[0].strip()
    work = template_workdir(tmp_path, small_tokenizer, small_shards)
    (work / "corpus").symlink_to(builtin_corpus, target_is_directory=True)
    [array] = readme_lines_on_cluster(
        slurm, work, [(line, ["--array=0-2", "-c", "1", f"--output={tmp_path}/prep-%A_%a.out"])],
        knobs={"VALID_FRACTION": str(SMALL_VALID_FRACTION), "SHARD_TOKENS": str(SMALL_SHARD_TOKENS)})
    first = tmp_path / f"prep-{array}_0.out"
    deadline = time.monotonic() + 120
    while not (first.is_file() and "submitted merge job" in first.read_text()):
        assert time.monotonic() < deadline, slurm.describe(array)
        time.sleep(0.2)
    merge = int(re.search(r"submitted merge job (\d+)", first.read_text()).group(1))
    assert slurm.wait(merge, 180) == "COMPLETED", slurm.describe(merge) + "\n" + "\n".join(
        p.read_text() for p in sorted(tmp_path.glob("*.out")))
    assert tree_bytes(work / "data" / "shards") == tree_bytes(small_shards)    # .parts deleted, all else equal
    assert [bool(re.search(rf"task {t} of 3 ", (tmp_path / f"prep-{array}_{t}.out").read_text()))
            for t in range(3)] == [True] * 3


@pytest.mark.slurm
def test_trainer_under_srun_mpi_pmix_sees_mpi4py_world(slurm, tmp_path, small_tokenizer, small_shards):
    """slurm/README.md's chaining block, lines 1-2 (CONFIG and SRUN_ARGS=--mpi=pmix exported, as its
    reader would): 2 steps, then the export chained on $train."""
    block = readme_block("chaining").lines()
    work = template_workdir(tmp_path, small_tokenizer, small_shards, steps=2)
    job, export = readme_lines_on_cluster(
        slurm, work, [(block[0], [*SIZE_2_RANKS, jobs_output(slurm)]),
                      (block[1], ["-c", "1", "--kill-on-invalid-dep=yes", jobs_output(slurm)])],
        knobs={"CONFIG": "my.yaml", "SRUN_ARGS": "--mpi=pmix"})
    slurm.wait(job, 300)
    res = JobResult(job, slurm.job_info(job).get("JobState", "?"), slurm.job_info(job).get("ExitCode", "?"),
                    slurm.output(job))
    assert_completed(slurm, res)
    for rank in (0, 1):
        assert re.search(rf"^{rank}: \[roberta-ds dist\] \S+: rank {rank}/2 .* from slurm, mpi4py world 2;",
                         res.output, re.MULTILINE), res.output
    assert re.search(r"^0: \[roberta-ds\] rank 0/2 .* from slurm, mpi4py world 2;", res.output, re.MULTILINE), res.output
    assert sorted(losses(work / "runs" / "roberta-pretrain")) == [1, 2]  # runs/<job name>: the template's default
    assert slurm.wait(export, 300) == "COMPLETED", slurm.describe(export)
    assert (work / "runs" / "roberta-pretrain" / "hf" / "step_00000002" / "model.safetensors").is_file()


@pytest.mark.slurm
def test_readme_srun_and_mpirun_lines_train_from_base_yaml(slurm, tmp_path, small_tokenizer, small_shards):
    """README.md's `srun python -m roberta_ds.train ...` and `mpirun -np 16 ...` lines in a 2-task job,
    with the README's YAML as base.yaml: srun trains steps 1-2, mpirun (2 processes) resumes to 4;
    the trainer finds its world from SLURM, then through mpi4py."""
    lines = readme_block("train-launch").lines()
    work = make_workdir(tmp_path / "work", small_tokenizer, small_shards, fp32=True)
    srun = scaled(lines[2], [("--config base.yaml", "--config base.yaml --set max_steps=2")])
    mpirun = scaled(lines[3], [("mpirun -np 16", "mpirun --allow-run-as-root --oversubscribe -np 2"),
                               ("--config base.yaml", "--config base.yaml --set max_steps=4")])
    body = (f"set -eu\ncd {shlex.quote(str(work))}\nexport PATH=\"$VENV/bin:$PATH\" "
            "TORCH_EXTENSIONS_DIR=\"$VENV/torch_extensions\" OMP_NUM_THREADS=1\n"
            f"echo '=== srun'\n{srun}\necho '=== mpirun'\n{mpirun}\n")
    res = slurm.run_job("#!/bin/bash\n" + body, env=job_env(), args=["-n", "2"], name="readme-launch",
                        cwd=tmp_path, timeout=400)
    assert_completed(slurm, res)
    first, second = res.output.split("=== mpirun")
    assert re.search(r"\[roberta-ds\] rank 0/2 \(local 0/2\) from slurm;", first), res.output
    assert re.search(r"\[roberta-ds\] rank 0/2 \(local 0/2\) from mpi, mpi4py world 2;", second), res.output
    assert "resumed from runs/base/checkpoints/step_00000002 at step 2" in second, res.output
    assert sorted(losses(work / "runs" / "base")) == [1, 2, 3, 4]


@pytest.mark.slurm
def test_deepspeed_launcher_template_runs_from_its_hostfile(slurm, straight_run, tmp_path, small_tokenizer,
                                                            small_shards):
    """README.md's cluster block, line 2. Trains, and on USR1 the launchers (which ignore it) let the
    ranks save and pass their 75 up."""
    ref_res, ref_out, _ = straight_run
    work = template_workdir(tmp_path, small_tokenizer, small_shards)
    out = work / "runs" / "base-ds"
    [job] = readme_lines_on_cluster(
        slurm, work, [(readme_block("cluster-sbatch").lines()[1],
                       ["-N", "1", "--ntasks-per-node=1", "--gpus-per-node=0", "-c", "2", jobs_output(slurm)])],
        knobs={"GPUS_PER_NODE": "2", "ROBERTA_DS_FAULTS": SLOW_STEP_3})
    signal_after_3_steps(slurm, job, out)
    slurm.scancel(job)                                   # the resume is test_preempted_run_...'s business
    log = slurm.output(job)
    host = slurm.run(["hostname", "-s"]).stdout.strip()
    hostfile = out / f"hostfile-{job}"
    assert hostfile.read_text() == f"{host} slots=2\n"
    assert f"hostfile runs/base-ds/hostfile-{job}:\n    {host} slots=2\n" in log and "dist_world_size=2" in log, log
    assert re.search(r"\[roberta-ds\] rank 0/2 \(local 0/2\) from deepspeed;", log), log
    saved = int(re.search(r"checkpoint \S+step_(\d+) committed \(signal SIGUSR1\)", log).group(1))
    assert f"requeueing job {job} (restart 1)" in log, log
    # Same model, data and world size as the srun run: the same steps, bit for bit.
    assert_completed(slurm, ref_res)
    want = losses(ref_out)
    assert losses(out) == {s: want[s] for s in range(1, saved + 1)}


@pytest.mark.slurm
def test_requeued_job_takes_over_its_lock_at_once(slurm, tmp_path, small_tokenizer, small_shards):
    """A job whose rank 0 is killed with kill -9 (a node lost, say) leaves its run lock with a fresh
    heartbeat; requeued, the same job id takes the lock over at once (lock_timeout_s is an hour here),
    resumes and finishes; the lock is gone at the end."""
    from roberta_ds.launch.run_lock import LOCK_NAME, read_holder

    gate = tmp_path / "go"
    work = template_workdir(tmp_path, small_tokenizer, small_shards, steps=4, save_interval=2, lock_timeout_s=3600)
    out = work / "runs" / "requeue"
    env = job_env(CONFIG="my.yaml", OUTPUT_DIR=str(out), ROBERTA_DS_FAULTS=f"wait={gate}@step:step=3,rank=0")
    job = slurm.sbatch(SLURM_DIR / "pretrain.sbatch", env=env, args=SIZE_2_RANKS, name="lock-requeue", cwd=work)
    deadline = time.monotonic() + 300
    while max(losses(out), default=0) < 3 or read_holder(out / LOCK_NAME) is None:
        assert time.monotonic() < deadline and slurm.job_info(job).get("JobState") in ("PENDING", "RUNNING"), \
            slurm.describe(job)
        time.sleep(0.2)
    holder = read_holder(out / LOCK_NAME)
    assert holder.slurm_job_id == str(job) and holder.slurm_restart == 0
    os.kill(holder.pid, 9)                               # rank 0, waiting at the start of step index 3
    assert slurm.wait(job, 120) == "FAILED", slurm.describe(job)   # rank 1's collective fails: exit 4
    assert read_holder(out / LOCK_NAME) == holder        # nobody released it
    gate.touch()
    slurm.requeue(job)
    assert slurm.wait(job, 300) == "COMPLETED", slurm.describe(job)
    log = slurm.output(job)
    took = re.search(rf"took over {re.escape(str(out / LOCK_NAME))} from host {re.escape(holder.host)}, pid "
                     rf"{holder.pid}, SLURM job {job}( on cluster \S+)? \(restart 0\), last heartbeat .*: the same "
                     rf"SLURM job {job}, requeued \(restart 0 -> 1\)", log)
    assert took, log
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'} at step 2" in log, log
    assert sorted(losses(out)) == [1, 2, 3, 4]
    assert not (out / LOCK_NAME).exists()
