"""Multi-node for real: the slurm/ templates, every launch path and the node faults on a SLURM cluster
of namespace nodes on this one machine (tests/cluster/node.sh; started once per session by the
`slurm_multinode` fixture: 3 nodes, jobs take 2, so a job requeued after a node failure finds 2
healthy ones).

Each node is a network + UTS + mount namespace: hostname rdsnodeN, its own address on a private /28,
its own /etc/hosts view and /dev/shm; /tmp, the checkout and the venv are shared (a cluster's shared
filesystem). Ranks on two nodes can only meet over the node network: loopback does not cross
namespaces, so a run that trains across them used the node network.

All runs train the tiny model on CPU (gloo, fp32, dropout 0, global batch 8 = micro 2 x accumulation
x world, 10 steps, a checkpoint every 5) and are compared with one reference: the same template on
ONE node with 2 ranks. With the same world size "equal" means bitwise (losses and final weights);
across world sizes (2 x 2 ranks, the universal-checkpoint resume) the same samples give losses
within 1e-5 relative, where a neighbouring batch differs by ~1e-2.

Cost: ~11 launches of 2-4 CPU ranks plus two node failures, each waiting for SLURM to declare the
node down (SlurmdTimeout, 10 s here) and for the requeued run.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cluster.slurm import MultiNodeCluster, _free_ports, clean_env, slurm_multinode  # noqa: F401
from readme_blocks import REPO, readme_block, run_bash, scaled
from test_slurm_templates import SLURM_DIR, VENV, job_env, losses, signal_after_3_steps

from roberta_ds.checkpoint import commit as ckpt
from roberta_ds.checkpoint.read_weights import load_weights

pytestmark = pytest.mark.slurm

STEPS, SAVE = 10, 5
TIMEOUT_S = 20
"""collective_timeout_s of every run: below the ~30 s SLURM takes to declare a silent node down, so
in a partition the survivors' own timeout fires first and can be seen."""
ONE_NODE = ["-N", "1", "--ntasks-per-node=2", "--gpus-per-node=0", "-c", "1"]
TWO_NODES = ["-N", "2", "--ntasks-per-node=1", "--gpus-per-node=0", "-c", "1"]
TWO_BY_TWO = ["-N", "2", "--ntasks-per-node=2", "--gpus-per-node=0", "-c", "1"]
# Rank 1 sleeps at the start of step index 7 (after the step-5 checkpoint): rank 0 waits for it inside
# the step's first gradient all-reduce, where the node fault hits.
SLOW_RANK_1 = "sleep=30@step:step=7,rank=1"


def knobs(tmp: Path, tokenizer: Path, shards: Path, out: Path) -> dict[str, str]:
    cfg = {
        "model": {"preset": "tiny", "max_positions": 66, "dropout": 0.0, "attention_dropout": 0.0},
        "data": {"train": [str(shards / "train")], "max_seq_len": 64, "num_workers": 0},
        "optim": {"total_steps": 20, "warmup_steps": 2},
        "tokenizer": str(tokenizer),
        "max_steps": STEPS,
        "log_interval": 1,
        "save_interval": SAVE,
        "tensorboard": False,
        "collective_timeout_s": TIMEOUT_S,
    }
    path = tmp / "train_config.json"
    path.write_text(json.dumps(cfg, indent=2))
    extra = (
        "--ds-set train_batch_size=8 --ds-set train_micro_batch_size_per_gpu=2 --ds-set bf16.enabled=false"
    )
    return job_env(
        CONFIG=str(path),
        DS_CONFIG=str(SLURM_DIR.parent / "ds_configs" / "zero2_bf16.json"),
        OUTPUT_DIR=str(out),
        EXTRA_ARGS=extra,
    )


def first_run_faults(tmp: Path, faults: str) -> str:
    """A PYTHON for the templates that injects `faults` in the job's first run only (a requeued run,
    SLURM_RESTART_COUNT >= 1, trains undisturbed)."""
    wrapper = tmp / "python_first_run_faults"
    wrapper.write_text(
        "#!/bin/bash\n"
        f'if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then export ROBERTA_DS_FAULTS={shlex.quote(faults)}; fi\n'
        f'exec {shlex.quote(str(VENV / "bin" / "python"))} "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper)


def no_ssh_path(tmp: Path) -> tuple[str, Path]:
    """A PATH whose `ssh` and `pdsh` record that they were called (and fail), and the record file."""
    bin_dir, record = tmp / "no_ssh_bin", tmp / "ssh_or_pdsh_called"
    bin_dir.mkdir()
    for name in ("ssh", "pdsh"):
        (bin_dir / name).write_text(
            f'#!/bin/bash\necho "{name} $*" >> {shlex.quote(str(record))}\nexit 255\n'
        )
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", record


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0] != "Z"
    except OSError:
        return False


def weights(out: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_weights(out / "checkpoints" / ckpt.tag_for(step))


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def metrics(out: Path) -> dict[int, dict]:
    """{step: record} from metrics.jsonl (the last record per step: a resumed run appends)."""
    return {
        r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    }


def rank_line(log: str, rank: int) -> str:
    """The collective-failure line of `rank` (srun --label prefixes it with the rank)."""
    return next((x for x in log.splitlines() if f"[roberta-ds] rank {rank}: collective failed" in x), "")


def wait_for(cond, what: str, mn: MultiNodeCluster, job: int, timeout: float = 300) -> float:
    """Poll `cond()` every 0.2 s; returns the time it became true; fails with the job's description."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, (
            f"{what} did not happen within {timeout:.0f} s\n{mn.describe(job)}"
        )
        time.sleep(0.2)
    return time.monotonic()


def submit(
    mn: MultiNodeCluster, template: str, env: dict[str, str], args: list[str], name: str, cwd: Path
) -> int:
    return mn.sbatch(SLURM_DIR / template, env=env, args=args, name=name, cwd=cwd)


def finish(mn: MultiNodeCluster, job: int, timeout: float = 400) -> str:
    """Wait for the job's end; the log (both runs of a requeued job: --open-mode=append)."""
    state = mn.wait(job, timeout)
    assert state == "COMPLETED", mn.describe(job)
    return mn.output(job)


@pytest.fixture(scope="module")
def reference(slurm_multinode, small_tokenizer, small_shards, tmp_path_factory):
    """pretrain.sbatch on ONE node with 2 ranks: the run every multi-node run is compared with."""
    mn, tmp = slurm_multinode, tmp_path_factory.mktemp("mn_reference")
    out = tmp / "run"
    job = submit(mn, "pretrain.sbatch", knobs(tmp, small_tokenizer, small_shards, out), ONE_NODE, "ref", tmp)
    t0 = time.monotonic()
    log = finish(mn, job)
    print(f"reference run: {time.monotonic() - t0:.1f} s")
    assert re.search(r"^0: \[roberta-ds\] rank 0/2 \(local 0/2\) from slurm", log, re.MULTILINE), log
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
    return out


@pytest.fixture(scope="module")
def two_by_two(slurm_multinode, small_tokenizer, small_shards, tmp_path_factory):
    """pretrain.sbatch on 2 nodes x 2 ranks (world 4), gloo told its interface (GLOO_SOCKET_IFNAME)."""
    mn, tmp = slurm_multinode, tmp_path_factory.mktemp("mn_2x2")
    out = tmp / "run"
    env = {**knobs(tmp, small_tokenizer, small_shards, out), "GLOO_SOCKET_IFNAME": "eth0"}
    job = submit(mn, "pretrain.sbatch", env, TWO_BY_TWO, "2x2", tmp)
    return job, finish(mn, job, 600), out


# ---- the cluster itself ---------------------------------------------------------------------------


def test_nodes_have_their_own_hostname_address_and_hosts_view(slurm_multinode, tmp_path):
    mn = slurm_multinode
    real_hosts = Path("/etc/hosts").read_text()
    info = tmp_path / "node_info.sh"
    info.write_text("""#!/bin/bash
names=$(getent hosts rdsnode1 rdsnode2 rdsnode3 | awk '{printf "%s=%s ", $2, $1}')
echo "$(hostname) $(ip -4 -o addr show dev eth0 | awk '{print $4}')" \\
     "routes=$(ip -4 route | grep -c default) net=$(ls /sys/class/net | tr '\\n' ,) $names"
""")
    info.chmod(0o755)
    res = mn.run_job(
        f"#!/bin/bash\nsrun -N3 --ntasks-per-node=1 -l {info}\n",
        args=["-N", "3"],
        name="nodes",
        cwd=tmp_path,
        timeout=60,
    )
    assert res.state == "COMPLETED", mn.describe(res.job_id)
    names = " ".join(f"rdsnode{i}={mn.net}.{i + 1}" for i in (1, 2, 3))
    for i in (1, 2, 3):
        want = f"{i - 1}: rdsnode{i} {mn.net}.{i + 1}/28 routes=0 net=eth0,lo, {names} "
        assert want in res.output, res.output
    # The names resolve only inside the nodes: the machine's /etc/hosts is untouched.
    assert Path("/etc/hosts").read_text() == real_hosts and "rdsnode" not in real_hosts


def links() -> list[str]:
    proc = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False)
    return proc.stdout.splitlines()


def test_readme_cluster_by_hand_and_a_stop_that_leaves_nothing(slurm_multinode, tmp_path):
    """slurm/README.md's by-hand block (a second cluster, 2 nodes, beside the session's): its nodes
    answer srun; then, left as a failing test leaves it (a job running, a node crashed under it,
    another node cut off), its stop line run twice leaves no daemon, process, namespace, link or file
    outside its directory."""
    base = tmp_path / "mn"
    lines = readme_block("multinode-cluster").lines()
    lines = [line.replace("/tmp/mn", str(base)) for line in lines]
    lines[0] = scaled(lines[0], [("SLURM_NODES=3", "SLURM_NODES=2")])
    assert all(str(base) in line for i, line in enumerate(lines) if i not in (2, 3)), lines
    ctld, slurmd = _free_ports(2)
    env = clean_env({"SLURMCTLD_PORT": str(ctld), "SLURMD_PORT": str(slurmd), "SLURM_WITH_MPI": "0"})
    before_links, had_netns_dir = set(links()), Path("/run/netns").exists()
    up = run_bash("\n".join(lines[:5]), cwd=REPO, env=env, timeout=300)
    try:
        assert up.returncode == 0, up.stdout
        mn = MultiNodeCluster(base)
        assert re.search(r"debug\*\s+up\s+infinite\s+2\s+idle rdsnode\[1-2\]", up.stdout), up.stdout
        assert sorted(re.findall(r"^rdsnode\d$", up.stdout, re.MULTILINE)) == ["rdsnode1", "rdsnode2"]
        assert f"inet {mn.address('rdsnode2')}/28" in up.stdout, up.stdout
        job = mn.sbatch("#!/bin/bash\nsrun -N2 sleep 300\n", args=["-N", "2"], name="stuck", cwd=tmp_path)
        mn.wait(job, 30, until={"RUNNING"})
        wait_for(lambda: len(mn.netns_pids("rdsnode2")) > 1, "the step on rdsnode2", mn, job, 30)
        for i in (5, 6, 7):  # cut, heal, crash rdsnode2
            res = run_bash(lines[1] + "\n" + lines[i], cwd=REPO, env=env, timeout=60)
            assert res.returncode == 0, (lines[i], res.stdout)
        mn.cut("rdsnode1")
        env_file = (base / "cluster.env").read_text().splitlines()
        ident = dict(x.split("=", 1) for x in env_file if "=" in x)["RDS_ID"]
        daemons = [int(p.read_text()) for p in (base / "state").glob("*.pid")]
        in_nodes = mn.netns_pids("rdsnode1")  # slurmd, the batch script, its srun, a task
        assert len(in_nodes) >= 3
    finally:
        for _ in range(2):  # the stop, twice
            stop = run_bash(lines[8], cwd=REPO, env=env, timeout=120)
            assert stop.returncode == 0, stop.stdout
    assert not [line for line in links() if f"rds{ident}" in line]
    netns = Path("/run/netns")
    assert not [n for n in (netns.iterdir() if netns.exists() else ()) if ident in n.name]
    assert netns.exists() == had_netns_dir and set(links()) <= before_links
    assert not (base / "cluster.env").exists()
    alive = [p for p in daemons + in_nodes if running(p)]
    assert alive == [], alive
    assert "rdsnode" not in Path("/etc/hosts").read_text()
    leftovers = subprocess.run(["pgrep", "-f", str(base)], capture_output=True, text=True, check=False)
    assert leftovers.stdout.split() == [], leftovers.stdout


# ---- training across nodes ------------------------------------------------------------------------


def test_pretrain_on_two_nodes_equals_one_node_through_a_preemption(
    slurm_multinode, reference, small_tokenizer, small_shards, tmp_path
):
    """pretrain.sbatch -N 2 (1 rank per node): USR1 mid-run gives one collective save on both hosts,
    exit 75 and a requeue; the resumed run finishes. Every loss and the final weights equal the
    one-node run's, bitwise; the log shows the rendezvous on node 1 and a rank on each host."""
    mn, out = slurm_multinode, tmp_path / "run"
    env = {**knobs(tmp_path, small_tokenizer, small_shards, out), "ROBERTA_DS_FAULTS": "sleep=6@step:step=3"}
    job = submit(mn, "pretrain.sbatch", env, TWO_NODES, "preempt2n", tmp_path)
    signal_after_3_steps(mn, job, out)
    log = finish(mn, job)
    a1, a2 = mn.address("rdsnode1"), mn.address("rdsnode2")
    # The preflight: each rank on its host, one rendezvous on node 1, gloo on each node's address.
    assert re.search(
        rf"^0: \[roberta-ds dist\] rdsnode1: rank 0/2 \(local 0/1\) from slurm; rendezvous "
        rf"rdsnode1:\d+; gloo {re.escape(a1)} \(hostname rdsnode1\)$",
        log,
        re.MULTILINE,
    ), log
    assert re.search(
        rf"^1: \[roberta-ds dist\] rdsnode2: rank 1/2 \(local 0/1\) from slurm; rendezvous "
        rf"rdsnode1:\d+; gloo {re.escape(a2)} \(hostname rdsnode2\)$",
        log,
        re.MULTILINE,
    ), log
    assert re.search(
        rf"^0: \[roberta-ds\] rank 0/2 \(local 0/1\) from slurm; rendezvous rdsnode1:\d+; .* x world 2"
        rf".*; gloo {re.escape(a1)}",
        log,
        re.MULTILINE,
    ), log
    # One collective save after USR1, both ranks exit 75, the job requeues itself and resumes.
    saves = [int(s) for s in re.findall(r"checkpoint \S+step_(\d+) committed \(signal SIGUSR1\)", log)]
    assert len(saves) == 1 and 4 <= saves[0] < STEPS, log
    assert "exiting with 75 (requeue me)" in log and f"requeueing job {job} (restart 1)" in log, log
    assert re.search(
        rf"^\[pretrain.sbatch\] job {job} \(restart 1\) on rdsnode\[\S+\]: 2 node", log, re.MULTILINE
    ), log
    assert f"resumed from {out / 'checkpoints' / ckpt.tag_for(int(saves[0]))} at step {saves[0]}" in log
    assert mn.job_info(job).get("Restarts") == "1"
    assert losses(out) == losses(reference)
    assert_bitwise(weights(out), weights(reference))


def test_pretrain_on_two_nodes_with_two_ranks_each(slurm_multinode, reference, two_by_two):
    mn = slurm_multinode
    _, log, out = two_by_two
    for rank, (host, local) in enumerate(
        [("rdsnode1", 0), ("rdsnode1", 1), ("rdsnode2", 0), ("rdsnode2", 1)]
    ):
        assert re.search(
            rf"^{rank}: \[roberta-ds dist\] {host}: rank {rank}/4 \(local {local}/2\) from slurm; "
            rf"rendezvous rdsnode1:\d+; gloo {re.escape(mn.address(host))} \(eth0, GLOO_SOCKET_IFNAME\)$",
            log,
            re.MULTILINE,
        ), log
    assert re.search(
        r"^0: \[roberta-ds\] rank 0/4 .* = micro 2 x accumulation 1 x world 4", log, re.MULTILINE
    ), log
    got, want = metrics(out), metrics(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step]["samples_consumed"] == want[step]["samples_consumed"]
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), f"step {step}"


def test_checkpoint_of_two_hosts_resumes_on_one_node_with_another_world(
    slurm_multinode, reference, two_by_two, small_tokenizer, small_shards, tmp_path
):
    """The step-5 checkpoint that 4 ranks on 2 hosts committed into the shared directory, resumed by 2
    ranks on one node (universal checkpoint): it continues with the same samples."""
    mn, (_, _, src) = slurm_multinode, two_by_two
    out = tmp_path / "run"
    shutil.copytree(src / "checkpoints" / ckpt.tag_for(SAVE), out / "checkpoints" / ckpt.tag_for(SAVE))
    (out / "checkpoints" / ckpt.POINTER_NAME).write_text(ckpt.tag_for(SAVE))
    # Written by the ranks of both hosts: every rank's RNG state is in it.
    assert sorted(p.name for p in (out / "checkpoints" / ckpt.tag_for(SAVE)).glob("rng_*")) == [
        ckpt.rng_file(r) for r in range(4)
    ]
    job = submit(
        mn, "pretrain.sbatch", knobs(tmp_path, small_tokenizer, small_shards, out), ONE_NODE, "uni", tmp_path
    )
    log = finish(mn, job)
    assert "world size changed (4 -> 2)" in log, log
    assert (
        f"resumed from {out / 'checkpoints' / ckpt.tag_for(SAVE)} at step {SAVE} (universal checkpoint)"
        in log
    )
    got, want = metrics(out), metrics(reference)
    assert sorted(got) == list(range(SAVE + 1, STEPS + 1))
    for step in got:
        assert got[step]["samples_consumed"] == want[step]["samples_consumed"]
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), f"step {step}"
    assert abs(want[SAVE + 1]["loss"] - want[SAVE + 2]["loss"]) > 1e-3  # a neighbouring batch would not pass


def test_deepspeed_template_on_two_nodes_from_its_hostfile_without_ssh(
    slurm_multinode, reference, small_tokenizer, small_shards, tmp_path
):
    mn, out = slurm_multinode, tmp_path / "run"
    path, record = no_ssh_path(tmp_path)
    env = {**knobs(tmp_path, small_tokenizer, small_shards, out), "GPUS_PER_NODE": "1", "PATH": path}
    job = submit(mn, "pretrain_deepspeed.sbatch", env, TWO_NODES, "ds2n", tmp_path)
    log = finish(mn, job)
    hostfile = out / f"hostfile-{job}"
    assert hostfile.read_text() == "rdsnode1 slots=1\nrdsnode2 slots=1\n"
    assert f"hostfile {hostfile}:\n    rdsnode1 slots=1\n    rdsnode2 slots=1\n" in log, log
    # One launcher per node (srun --label: 0 on rdsnode1, 1 on rdsnode2), each starting its node's rank.
    assert re.search(r"^0: .*node_rank=0", log, re.MULTILINE) and re.search(
        r"^1: .*node_rank=1", log, re.MULTILINE
    ), log
    assert "dist_world_size=2" in log
    assert re.search(r"\[roberta-ds\] rank 0/2 \(local 0/1\) from deepspeed; rendezvous rdsnode1:\d+", log), (
        log
    )
    assert not record.exists(), record.read_text()
    assert losses(out) == losses(reference)
    assert_bitwise(weights(out), weights(reference))


def test_mpi_discovery_across_nodes_srun_pmix_and_mpirun(slurm_multinode, tmp_path):
    """dist_probe under `srun --mpi=pmix` and under `mpirun` (which starts its daemons on the other
    node through srun, never ssh): one world of 4 with 2 ranks on each host, mpi4py agreeing."""
    mn = slurm_multinode
    path, record = no_ssh_path(tmp_path)
    probe = shlex.join(
        [str(VENV / "bin" / "python"), str(SLURM_DIR.parent / "tests" / "ds_scripts" / "dist_probe.py")]
    )
    body = (
        "set -u\nexport OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1\n"
        f"echo '== pmix'; srun --mpi=pmix --kill-on-bad-exit=1 {probe}\n"
        f"echo '== mpirun'; mpirun -np 4 --map-by ppr:2:node {probe}\n"
    )
    res = mn.run_job(
        "#!/bin/bash\n" + body,
        env={"PATH": path, "PYTHONPATH": str(SLURM_DIR.parent)},
        args=TWO_BY_TWO[:4],
        name="mpi",
        cwd=tmp_path,
        timeout=300,
    )
    assert res.state == "COMPLETED", mn.describe(res.job_id)
    pmix, mpirun = res.output.split("== mpirun")
    for part, source in ((pmix, "slurm"), (mpirun, "mpi")):
        rows = sorted(
            (
                dict(kv.split("=", 1) for kv in line.split()[1:])
                for line in part.splitlines()
                if line.startswith("DIST_PROBE ")
            ),
            key=lambda d: int(d["rank"]),
        )
        got = [
            (r["rank"], r["world"], r["host"], r["local_rank"], r["source"], r["allreduce"], r["ok"])
            for r in rows
        ]
        assert got == [
            (str(i), "4", f"rdsnode{i // 2 + 1}", str(i % 2), source, "10.0", "1") for i in range(4)
        ], part
        assert {r["master"].split(":")[0] for r in rows} == {"rdsnode1"}, part
    assert pmix.count("mpi4py agrees with the srun step: rank") == 4, pmix
    assert not record.exists(), record.read_text()


# ---- node faults ----------------------------------------------------------------------------------


def start_faulty_run(
    mn: MultiNodeCluster, tmp: Path, tokenizer: Path, shards: Path, name: str, args: list[str]
) -> tuple[int, Path, list[str]]:
    """A 2-node pretrain.sbatch run whose rank 1 stalls in step 7 of its first run; returns once rank 0
    waits for it there (the step-5 checkpoint committed). (job, output dir, its nodes)."""
    out = tmp / "run"
    env = {**knobs(tmp, tokenizer, shards, out), "PYTHON": first_run_faults(tmp, SLOW_RANK_1)}
    job = submit(mn, "pretrain.sbatch", env, args, name, tmp)
    wait_for(
        lambda: "1: [fault] rank 1: sleep at step step 7" in mn.output(job),
        "rank 1 stalling in step 7",
        mn,
        job,
    )
    nodes = mn.run(["scontrol", "show", "hostnames", mn.job_info(job)["NodeList"]]).stdout.split()
    assert (out / "checkpoints" / ckpt.tag_for(SAVE) / ckpt.META_NAME).is_file()
    return job, out, nodes


def assert_requeued_and_resumed(mn: MultiNodeCluster, job: int, out: Path, reference: Path, lost: str) -> str:
    """The job's first run ended NODE_FAIL and SLURM requeued it once; the second resumed from the last
    committed checkpoint and finished with the reference's losses and weights. Returns the log."""
    log = finish(mn, job, 600)
    first = log.split(f"[pretrain.sbatch] job {job} (restart 1)")[0]
    script = ("[pretrain.sbatch]", "srun:", "slurmstepd")
    print("\n".join(x for x in first.splitlines() if x.startswith(script)))
    assert f"requeue job JobId={job} due to failure of node {lost}" in mn.slurmctld_log.read_text()
    assert mn.job_info(job).get("Restarts") == "1", mn.describe(job)  # no requeue loop
    assert re.search(
        rf"training failed \([^)]*exit code \d+\): node\(s\) {lost} "
        r"\(down\*\) of this job failed\. SLURM ends this run as NODE_FAIL and requeues the job onto "
        "healthy nodes",
        log,
    ), log
    assert f"resumed from {out / 'checkpoints' / ckpt.tag_for(SAVE)} at step {SAVE}" in log, log
    assert losses(out) == losses(reference)
    assert_bitwise(weights(out), weights(reference))
    return log


def test_node_crash_mid_step(slurm_multinode, reference, small_tokenizer, small_shards, tmp_path):
    """SIGKILL of every process on node 2 mid-step: rank 0 (node 1) ends at once, naming rank 1 and its
    host; SLURM declares the node down, ends the run as NODE_FAIL and requeues it onto the two healthy
    nodes, where it resumes from the step-5 checkpoint and ends as an uninterrupted run would."""
    mn = slurm_multinode
    job, out, nodes = start_faulty_run(mn, tmp_path, small_tokenizer, small_shards, "crash", TWO_NODES)
    lost = nodes[1]
    try:
        t0 = time.monotonic()
        mn.crash(lost)
        t_exit = wait_for(lambda: rank_line(mn.output(job), 0), "rank 0's failure message", mn, job, 120)
        line = rank_line(mn.output(job), 0)
        print(f"crash of {lost}: rank 0 ended {t_exit - t0:.1f} s later:\n{line}")
        # Its collective broke when the peer's sockets closed: no waiting for the timeout.
        assert "Timed out" not in line and f"rank 1 on {lost}" in line, line
        assert f"no heartbeat (process dead or frozen) from rank 1 on {lost}" in line, line
        assert f"srun: error: {nodes[0]}: task 0: Exited with exit code 4" in wait_and_read(
            mn, job, "exit code 4"
        )
        t_requeue = wait_for(
            lambda: mn.job_info(job).get("Restarts") == "1", "the NODE_FAIL requeue", mn, job, 120
        )
        print(f"node crash: SLURM requeued the job {t_requeue - t0:.1f} s after the crash")
        log = assert_requeued_and_resumed(mn, job, out, reference, lost)
        print(f"node crash: {time.monotonic() - t0:.1f} s from the crash to the end of the requeued run")
        second = log.split(f"[pretrain.sbatch] job {job} (restart 1) on ")[1]
        assert lost not in second.splitlines()[0], second.splitlines()[0]  # onto healthy nodes
    finally:
        mn.run(["scancel", str(job)], check=False)
        mn.restore(lost)


def wait_and_read(mn: MultiNodeCluster, job: int, text: str) -> str:
    wait_for(lambda: text in mn.output(job), repr(text), mn, job, 120)
    return mn.output(job)


def test_network_partition_mid_step(slurm_multinode, reference, small_tokenizer, small_shards, tmp_path):
    """Node 2's link cut mid-step: rank 0 ends after collective_timeout_s naming rank 1 and its host;
    SLURM declares the silent node down and requeues the job, which (node 3 excluded) waits for node 2
    to be restored, resumes there from the step-5 checkpoint and ends as an uninterrupted run would.
    Nothing of the first run survives on node 2."""
    mn = slurm_multinode
    job, out, nodes = start_faulty_run(
        mn, tmp_path, small_tokenizer, small_shards, "partition", [*TWO_NODES, "--exclude=rdsnode3"]
    )
    lost = nodes[1]
    try:
        t0 = time.monotonic()
        mn.cut(lost)
        t_exit = wait_for(lambda: rank_line(mn.output(job), 0), "rank 0's failure message", mn, job, 120)
        line = rank_line(mn.output(job), 0)
        print(f"partition of {lost}: rank 0 ended {t_exit - t0:.1f} s later:\n{line}")
        assert f"Timed out waiting {TIMEOUT_S * 1000}ms" in line and f"rank 1 on {lost}" in line, line
        assert f"no heartbeat (process dead or frozen) from rank 1 on {lost}" in line, line
        assert f"collective_timeout_s={TIMEOUT_S}" in line
        mn.wait_node_state(lost, ("down*",), 120)
        t_requeue = wait_for(
            lambda: mn.job_info(job).get("Restarts") == "1", "the NODE_FAIL requeue", mn, job, 60
        )
        print(f"partition: SLURM requeued the job {t_requeue - t0:.1f} s after the cut")
        # Pending (after its COMPLETING phase): no healthy pair of nodes without node 2.
        wait_for(lambda: mn.job_info(job).get("JobState") == "PENDING", "the job pending", mn, job, 60)
        t_heal = time.monotonic()
        mn.restore(lost)
        assert_requeued_and_resumed(mn, job, out, reference, lost)
        print(f"partition: requeued run done {time.monotonic() - t_heal:.1f} s after the heal")
        assert f"[pretrain.sbatch] job {job} (restart 1) on rdsnode[1-2]" in mn.output(
            job
        )  # the restored node
        slurmd = int((mn.base / "state" / f"slurmd-{lost}.pid").read_text())
        wait_for(lambda: mn.netns_pids(lost) == [slurmd], f"nothing but slurmd left on {lost}", mn, job, 60)
    finally:
        mn.run(["scancel", str(job)], check=False)
        mn.restore(lost)


# ---- wrong network settings -----------------------------------------------------------------------


def test_busy_rendezvous_port_is_named(slurm_multinode, small_tokenizer, small_shards, tmp_path):
    """Rank 0's port is held on node 1: the trainer (no preflight) stops at once naming host and port;
    the job ends, its other rank stopped by srun."""
    mn = slurm_multinode
    port = 29877
    squat = (
        "import socket,sys,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        f"s.bind(('0.0.0.0', {port})); s.listen(8); print('ready', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [
            "bash",
            str(Path(__file__).parent / "cluster" / "node.sh"),
            "run",
            str(mn.base),
            "rdsnode1",
            sys.executable,
            "-c",
            squat,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        env = {
            **knobs(tmp_path, small_tokenizer, small_shards, tmp_path / "run"),
            "PREFLIGHT": "0",
            "MASTER_PORT": str(port),
            "EXIT_WAIT": "5",
        }
        job = submit(mn, "pretrain.sbatch", env, TWO_NODES, "busyport", tmp_path)
        assert mn.wait(job, 300) == "FAILED", mn.describe(job)
        log = mn.output(job)
        assert (
            f"rendezvous port {port} on rdsnode1 (MASTER_ADDR=rdsnode1, rank 0's host) is in use by another "
            "process"
        ) in log, log
        assert re.search(r"training failed with exit code \d+; not requeued", log), log
    finally:
        holder.kill()
        holder.wait()


def test_wrong_interface_or_loopback_hostname_is_refused_naming_the_host(
    slurm_multinode, small_tokenizer, small_shards, tmp_path
):
    mn = slurm_multinode
    # The template with gloo told to use loopback: its preflight refuses on every node, the job ends.
    env = {**knobs(tmp_path, small_tokenizer, small_shards, tmp_path / "run"), "GLOO_SOCKET_IFNAME": "lo"}
    res = mn.run_job(
        SLURM_DIR / "pretrain.sbatch", env=env, args=TWO_NODES, name="lo", cwd=tmp_path, timeout=120
    )
    assert res.state == "FAILED", mn.describe(res.job_id)
    for host in ("rdsnode1", "rdsnode2"):
        assert (
            f"[roberta-ds dist] {host}: error: gloo would use 127.0.0.1 (lo, GLOO_SOCKET_IFNAME) on {host}: "
            "a loopback address"
        ) in res.output, res.output
    assert "preflight failed" in res.output and "training finished" not in res.output
    # An interface that does not exist, and nodes whose own name maps to 127.0.1.1 (Debian's default
    # /etc/hosts line), each seen by the preflight command of the templates.
    py = shlex.quote(str(VENV / "bin" / "python"))
    body = (
        f"export DS_ACCELERATOR=cpu PYTHONPATH={shlex.quote(str(SLURM_DIR.parent))}\n"
        f"GLOO_SOCKET_IFNAME=ib0 srun -l {py} -m roberta_ds.dist\n"
        'srun -l unshare --mount sh -c \'sed "s/.* $(hostname)$/127.0.1.1 $(hostname)/" /etc/hosts > '
        "$SLURM_SUBMIT_DIR/hosts.$(hostname) && "
        f"mount --bind $SLURM_SUBMIT_DIR/hosts.$(hostname) /etc/hosts && exec {py} -m roberta_ds.dist'\n"
    )
    res = mn.run_job("#!/bin/bash\n" + body, args=TWO_NODES[:4], name="badnet", cwd=tmp_path, timeout=120)
    assert res.state == "FAILED", mn.describe(res.job_id)
    out = res.output
    assert (
        "1: [roberta-ds dist] rdsnode2: error: GLOO_SOCKET_IFNAME=ib0: rdsnode2 has no interface 'ib0' "
        f"(interfaces: lo 127.0.0.1, eth0 {mn.address('rdsnode2')})" in out
    ), out
    assert (
        "0: [roberta-ds dist] rdsnode1: error: MASTER_ADDR=rdsnode1 is a loopback address (127.0.1.1) on "
        "rdsnode1" in out
    ), out
    assert (
        "1: [roberta-ds dist] rdsnode2: error: gloo would use 127.0.1.1 (hostname rdsnode2) on rdsnode2: a "
        "loopback address" in out
    ), out
