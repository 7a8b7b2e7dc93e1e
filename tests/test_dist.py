"""Discovery (roberta_ds.dist) in every launcher's environment, from recorded variable sets.

The variable sets are what the launchers set on this machine (torchrun 2.x, deepspeed 0.19's
launcher, Slurm 22.05 srun / sbatch, OpenMPI 4.1 mpirun, srun --mpi=pmix); scontrol and mpi4py are
injected. Real launches: the `slow` tests at the end (torchrun, deepspeed launcher) and
tests/test_slurm_dist.py (srun, mpirun, srun --mpi=pmix on a real cluster).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from roberta_ds.errors import ConfigError
from roberta_ds.launch import dist
from roberta_ds.launch.dist import DistEnv, check_world, discover, expected_world_size, export_env

REPO = Path(__file__).resolve().parent.parent
PROBE = REPO / "tests" / "ds_scripts" / "dist_probe.py"


class FakeComm:
    """An mpi4py communicator as seen by one rank; bcast returns what rank 0 would have sent."""

    def __init__(self, rank: int, size: int, root_offer: object = None) -> None:
        self.rank, self.size, self.root_offer = rank, size, root_offer
        self.sent: object = None

    def Get_rank(self) -> int:  # noqa: N802
        return self.rank

    def Get_size(self) -> int:  # noqa: N802
        return self.size

    def bcast(self, obj: object, root: int = 0) -> object:
        if self.rank == root:
            self.sent = obj
            return obj
        return self.root_offer


def comms(rank: int, size: int, local_rank: int, local_size: int, offer: object = None):
    world, local = FakeComm(rank, size, offer), FakeComm(local_rank, local_size)
    calls: list[FakeComm] = []

    def factory():
        calls.append(world)
        return world, local
    factory.calls = calls  # type: ignore[attr-defined]
    factory.world = world  # type: ignore[attr-defined]
    return factory


def no_mpi():
    raise AssertionError("MPI must not be touched here")


def no_scontrol(nodelist: str) -> list[str]:
    raise AssertionError(f"scontrol must not be called for {nodelist!r}")


def srun_env(procid: int, ntasks: int = 2, *, localid: int | None = None, job: int = 4242, step: int = 0,
             nodelist: str = "vm", tasks_per_node: str | None = None, nodename: str = "vm") -> dict[str, str]:
    """The variables `srun -n N` gives each task (Slurm 22.05, recorded on a one-node cluster)."""
    return {
        "SLURM_JOB_ID": str(job), "SLURM_JOBID": str(job),
        "SLURM_STEP_ID": str(step), "SLURM_STEPID": str(step),
        "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid if localid is None else localid),
        "SLURM_NTASKS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_NODEID": "0",
        "SLURM_STEP_NODELIST": nodelist, "SLURM_JOB_NODELIST": nodelist, "SLURMD_NODENAME": nodename,
        "SLURM_STEP_TASKS_PER_NODE": tasks_per_node or str(ntasks),
        "SLURM_TASKS_PER_NODE": tasks_per_node or str(ntasks),
    }


BATCH_ENV = {  # what a batch script sees (sbatch -n 2): note SLURM_PROCID=0 and no step variables
    "SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_NODEID": "0",
    "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "vm",
}


def ompi_env(rank: int, size: int = 2) -> dict[str, str]:
    return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(size),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_SIZE": str(size),
            "PMIX_RANK": str(rank), "PMIX_NAMESPACE": "prterun-vm-1@1"}


# ---- single process and torch-style environments ----------------------------------------------

def test_single_process_defaults():
    env = discover({}, mpi_comm_factory=no_mpi, hostnames=no_scontrol)
    assert env == DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, "single")
    assert discover({"MASTER_PORT": "31000"}).master_port == 31000


def test_torchrun():
    environ = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
               "MASTER_ADDR": "node0", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "none",
               "TORCHELASTIC_RESTART_COUNT": "0"}
    assert discover(environ, mpi_comm_factory=no_mpi) == DistEnv(3, 8, 1, 2, "node0", 29400, "torchrun")


def test_deepspeed_launcher():
    environ = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4", "CROSS_RANK": "1",
               "CROSS_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert discover(environ) == DistEnv(5, 8, 1, 4, "10.0.0.1", 29500, "deepspeed")


def test_hand_set_env_and_defaults():
    environ = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    env = discover(environ)
    assert (env.source, env.local_world_size) == ("env", 2)   # no LOCAL_WORLD_SIZE: one node assumed
    one = discover({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert (one.master_addr, one.master_port) == ("127.0.0.1", 29500)


@pytest.mark.parametrize("environ, names", [
    ({"RANK": "0"}, ["WORLD_SIZE", "LOCAL_RANK"]),
    ({"RANK": "0", "WORLD_SIZE": "2"}, ["LOCAL_RANK"]),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ["RANK=2", "WORLD_SIZE=2"]),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, ["MASTER_ADDR", "MASTER_PORT"]),
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, ["RANK='x'"]),
])
def test_torch_env_errors_name_the_variables(environ, names):
    with pytest.raises(ConfigError) as e:
        discover(environ)
    for name in names:
        assert name in str(e.value)


def test_torchrun_inside_srun_is_not_a_contradiction():
    # srun -N 2 -n 2 torchrun --nproc_per_node 4: SLURM_PROCID is the node index, RANK the worker's.
    environ = {**srun_env(1, 2, nodelist="n[1-2]", tasks_per_node="1(x2)"), "RANK": "6", "WORLD_SIZE": "8",
               "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "n1", "MASTER_PORT": "29500",
               "TORCHELASTIC_RUN_ID": "j1"}
    assert discover(environ, hostnames=no_scontrol, mpi_comm_factory=no_mpi).rank == 6


def test_rank_exported_in_batch_script_is_refused():
    # `export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS` in the batch script (SLURM_PROCID=0 there),
    # then srun: task 1 inherits RANK=0 -> two rank 0s.
    environ = {**srun_env(1), "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "vm",
               "MASTER_PORT": "29500"}
    with pytest.raises(ConfigError, match="contradictory") as e:
        discover(environ, hostnames=no_scontrol)
    assert "RANK=0" in str(e.value) and "SLURM_PROCID" in str(e.value)
    # A stale single-process world inside a 2-task step is refused too (two independent rank 0s).
    stale = {**srun_env(0), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    with pytest.raises(ConfigError, match="WORLD_SIZE=1"):
        discover(stale, hostnames=no_scontrol)


def test_stale_rank_under_mpirun_is_refused():
    environ = {**ompi_env(1), "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
               "MASTER_PORT": "1"}
    with pytest.raises(ConfigError, match="OMPI_COMM_WORLD_RANK"):
        discover(environ, mpi_comm_factory=no_mpi)


def test_export_env_round_trip(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    env = discover(srun_env(1), hostnames=no_scontrol)
    export_env(env)
    assert os.environ["RANK"] == "1" and os.environ["WORLD_SIZE"] == "2"
    assert os.environ["MASTER_ADDR"] == "vm" and os.environ["MASTER_PORT"] == str(env.master_port)
    # Discovering again (e.g. inside the trainer after the probe) agrees, through the env path.
    again = discover({**srun_env(1), **{k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                  "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                                                  "MASTER_PORT")}})
    assert (again.rank, again.world_size, again.master_port, again.source) == (1, 2, env.master_port, "env")


# ---- SLURM -----------------------------------------------------------------------------------------

def test_srun_step_one_node():
    env = discover(srun_env(1, job=4242, step=3), hostnames=no_scontrol, mpi_comm_factory=no_mpi)
    assert env == DistEnv(1, 2, 1, 2, "vm", dist.slurm_port(4242, 3), "slurm")
    assert env.master_port == 20000 + (7 * 4242 + 3) % 12000


def test_srun_step_multi_node_uses_scontrol_and_node_index():
    calls: list[str] = []

    def hostnames(nodelist: str) -> list[str]:
        calls.append(nodelist)
        return ["gpu07", "gpu08", "gpu09"]

    environ = srun_env(9, 12, localid=1, nodelist="gpu[07-09]", tasks_per_node="4(x3)", nodename="gpu09")
    env = discover(environ, hostnames=hostnames)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (9, 12, 1, 4)
    assert env.master_addr == "gpu07" and calls == ["gpu[07-09]"]
    # Uneven tasks per node: this node (second of the step) runs one task.
    uneven = srun_env(3, 4, localid=0, nodelist="a,b", tasks_per_node="3,1", nodename="b")
    assert discover(uneven, hostnames=lambda _: ["a", "b"]).local_world_size == 1


def test_srun_master_overrides_skip_scontrol():
    environ = {**srun_env(0, nodelist="n[1-4]", tasks_per_node="1(x2)"), "MASTER_ADDR": "ib-n1",
               "MASTER_PORT": "31111"}
    env = discover(environ, hostnames=lambda _: ["n1", "n2"])
    assert (env.master_addr, env.master_port) == ("ib-n1", 31111)


def test_slurm_port_is_deterministic_safe_and_spread():
    ports = {dist.slurm_port(j) for j in range(100_000, 112_000)}
    assert len(ports) == 12000 and min(ports) >= 20000 and max(ports) < 32000
    assert dist.slurm_port(5, 0) != dist.slurm_port(5, 1)             # concurrent steps of one job
    assert dist.slurm_port(5, 1) == dist.slurm_port(5, 1)


def test_parse_tasks_per_node():
    assert dist.parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert dist.parse_tasks_per_node("8") == [8]
    with pytest.raises(ConfigError, match="tasks-per-node"):
        dist.parse_tasks_per_node("2(3)")


def test_srun_step_missing_procid():
    environ = srun_env(0)
    del environ["SLURM_PROCID"]
    with pytest.raises(ConfigError, match="SLURM_PROCID"):
        discover(environ, hostnames=no_scontrol)


def test_batch_script_is_a_single_process():
    # The batch shell has SLURM_PROCID=0 but no step: it is one process, and the job promised 2.
    env = discover(BATCH_ENV, hostnames=no_scontrol, mpi_comm_factory=no_mpi)
    assert (env.source, env.world_size) == ("single", 1)
    assert expected_world_size(BATCH_ENV) == 2
    with pytest.raises(ConfigError, match="without `srun`"):
        check_world(env, 1, expected_world_size(BATCH_ENV))


# ---- MPI ---------------------------------------------------------------------------------------------

def test_mpirun_inside_allocation_ignores_inherited_slurm_procid():
    # mpirun -np 2 in a batch script: both ranks inherit SLURM_PROCID=0 (and an orted srun step may
    # add SLURM_STEP_NUM_TASKS=1); rank and size must come from MPI.
    environ = {**BATCH_ENV, "SLURM_STEP_NUM_TASKS": "1", **ompi_env(1)}
    factory = comms(1, 2, 1, 2, offer=("vm", 25000))
    env = discover(environ, mpi_comm_factory=factory, hostnames=no_scontrol)
    assert env == DistEnv(1, 2, 1, 2, "vm", 25000, "mpi")
    assert expected_world_size(environ) == 2


def test_mpi_rank0_offers_its_host_and_a_free_port(monkeypatch):
    monkeypatch.setattr(dist.socket, "gethostname", lambda: "head")
    factory = comms(0, 4, 0, 2)
    env = discover(ompi_env(0, 4), mpi_comm_factory=factory)
    assert (env.rank, env.world_size, env.local_world_size, env.master_addr) == (0, 4, 2, "head")
    assert factory.world.sent == ("head", env.master_port) and 0 < env.master_port < 65536
    fixed = discover({**ompi_env(0, 4), "MASTER_ADDR": "ib0", "MASTER_PORT": "23456"},
                     mpi_comm_factory=comms(0, 4, 0, 2))
    assert (fixed.master_addr, fixed.master_port) == ("ib0", 23456)


def test_mpi_world_smaller_than_launcher_promised_is_refused():
    # mpiexec from one MPI, mpi4py linked to another: every process is a singleton world.
    with pytest.raises(ConfigError, match="OMPI_COMM_WORLD_SIZE=2 but mpi4py's COMM_WORLD has 1"):
        discover(ompi_env(0), mpi_comm_factory=comms(0, 1, 0, 1, offer=("h", 1)))


def test_mpich_hydra_inside_step_uses_mpi():
    # mpiexec (hydra) starts one proxy per node with srun: the step has 2 tasks, MPI has 8 ranks.
    environ = {**srun_env(0, 2, nodelist="n[1-2]", tasks_per_node="1(x2)"), "PMI_RANK": "3", "PMI_SIZE": "8"}
    env = discover(environ, mpi_comm_factory=comms(3, 8, 3, 4, offer=("n1", 26000)), hostnames=no_scontrol)
    assert (env.source, env.rank, env.world_size, env.local_world_size) == ("mpi", 3, 8, 4)
    assert expected_world_size(environ) == 8


def test_pmi_rank_disagreeing_with_slurm_procid_is_refused():
    environ = {**srun_env(0), "PMI_RANK": "1", "PMI_SIZE": "2"}
    with pytest.raises(ConfigError, match="PMI_RANK=1 but SLURM_PROCID=0"):
        discover(environ, mpi_comm_factory=no_mpi, hostnames=no_scontrol)


def test_srun_pmix_uses_slurm_and_cross_checks_mpi():
    environ = {**srun_env(1), "PMIX_RANK": "1", "PMIX_NAMESPACE": "slurm.pmix.3.0"}
    factory = comms(1, 2, 1, 2)
    env = discover(environ, mpi_comm_factory=factory, hostnames=no_scontrol)
    assert env.source == "slurm" and env.world_size == 2 and len(factory.calls) == 1
    # Wrong PMI plugin: MPI made one-process worlds -> refused, naming the fix.
    with pytest.raises(ConfigError, match="--mpi=pmix"):
        discover(environ, mpi_comm_factory=comms(0, 1, 0, 1), hostnames=no_scontrol)
    # MPI not in use: no cross-check.
    assert discover(environ, use_mpi=False, mpi_comm_factory=no_mpi, hostnames=no_scontrol).rank == 1
    off = {**environ, "ROBERTA_DS_MPI": "0"}
    assert discover(off, mpi_comm_factory=no_mpi, hostnames=no_scontrol).rank == 1


def test_srun_pmix_without_mpi4py_skips_the_cross_check(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)    # `from mpi4py import MPI` -> ImportError
    environ = {**srun_env(0), "PMIX_RANK": "0"}
    assert discover(environ, hostnames=no_scontrol).source == "slurm"


def test_mpi_launch_without_mpi4py_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ConfigError, match=r"pip install roberta-ds\[mpi\]"):
        discover(ompi_env(0))


def test_mpi_launch_with_mpi_disabled_is_refused():
    with pytest.raises(ConfigError, match="OMPI_COMM_WORLD_SIZE"):
        discover(ompi_env(0), use_mpi=False, mpi_comm_factory=no_mpi)


# ---- promises and checks ---------------------------------------------------------------------------

@pytest.mark.parametrize("environ, want", [
    ({}, None),
    ({"ROBERTA_DS_EXPECT_WORLD_SIZE": "4", "SLURM_NTASKS": "2"}, 4),
    ({"WORLD_SIZE": "8", "TORCHELASTIC_RUN_ID": "x", **srun_env(0, 2)}, 8),     # torchrun inside srun
    ({"WORLD_SIZE": "2", "RANK": "0"}, 2),                                     # by hand
    (srun_env(0, 2), 2),
    ({**srun_env(0, 2), "WORLD_SIZE": "2", "RANK": "0"}, 2),                    # after export_env
    ({**BATCH_ENV, "WORLD_SIZE": "1", "RANK": "0"}, 2),                        # export_env in batch shell
    ({**BATCH_ENV, **ompi_env(0, 2)}, 2),
    ({"PMI_SIZE": "16", "PMI_RANK": "0"}, 16),
])
def test_expected_world_size(environ, want):
    assert expected_world_size(environ) == want


def test_check_world():
    env = DistEnv(0, 2, 0, 2, "h", 1, "slurm")
    check_world(env, 2, 2)
    check_world(env, 2, None)
    with pytest.raises(ConfigError, match="re-initialised"):
        check_world(env, 4, 4)
    single = DistEnv(0, 1, 0, 1, "h", 1, "mpi")
    with pytest.raises(ConfigError, match="alone in a world of 1") as e:
        check_world(single, 1, 2)
    assert "--mpi=pmix" in str(e.value) and "ROBERTA_DS_EXPECT_WORLD_SIZE" in str(e.value)
    with pytest.raises(ConfigError, match="promised 8"):
        check_world(DistEnv(0, 4, 0, 4, "h", 1, "env"), 4, 8)


def test_dist_env_validates():
    with pytest.raises(ConfigError, match="source"):
        DistEnv(0, 1, 0, 1, "h", 1, "pdsh")
    with pytest.raises(ConfigError, match="rank 2 is outside"):
        DistEnv(2, 2, 0, 1, "h", 1, "env")
    with pytest.raises(ConfigError, match="local rank 1"):
        DistEnv(1, 2, 1, 1, "h", 1, "env")
    with pytest.raises(ConfigError, match="MASTER_PORT"):
        DistEnv(0, 1, 0, 1, "h", 70000, "env")


def test_print0_and_log_source(capsys, monkeypatch, caplog):
    dist.print0("hello", env=DistEnv(1, 2, 1, 2, "h", 1, "env"))
    dist.print0("world", env=DistEnv(0, 2, 0, 2, "h", 1, "env"))
    monkeypatch.setenv("RANK", "3")
    dist.print0("not me")
    dist.print0("a", 1, sep="-", end="!\n", env=DistEnv(0, 1, 0, 1, "h", 1, "single"))
    out = capsys.readouterr()
    assert out.out == "world\na-1!\n"
    dist.print0("err", file=sys.stderr, env=DistEnv(0, 1, 0, 1, "h", 1, "single"))
    assert capsys.readouterr().err == "err\n"
    line = dist.log_source(DistEnv(1, 2, 1, 2, "vm", 21234, "slurm"))
    assert line == "rank 1/2 (local 1/2) from slurm; rendezvous vm:21234"
    with caplog.at_level(logging.INFO, logger="roberta_ds.dist"):
        discover(srun_env(0), hostnames=no_scontrol)
    assert "from slurm" in caplog.text


# ---- real launches on this machine (no cluster needed) ---------------------------------------------

def _free_port() -> int:
    return dist._free_port()


def _probe_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    return env


def _probe_lines(out: str) -> list[dict[str, str]]:
    return [dict(kv.split("=", 1) for kv in line.split()[1:]) for line in out.splitlines()
            if line.startswith("DIST_PROBE ")]


@pytest.mark.slow
def test_torchrun_launch_discovers_torchrun():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(PROBE)]
    proc = subprocess.run(cmd, env=_probe_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = sorted(_probe_lines(proc.stdout), key=lambda d: d["rank"])
    assert [(d["rank"], d["world"], d["source"], d["ok"]) for d in lines] == [
        ("0", "2", "torchrun", "1"), ("1", "2", "torchrun", "1")], proc.stdout + proc.stderr


@pytest.mark.slow
def test_deepspeed_launcher_discovers_deepspeed():
    # What `deepspeed --num_gpus 2 probe.py` runs on each node, minus the runner's own import of
    # deepspeed (~5 s here); the probe inits torch.distributed directly (test_slurm_dist covers
    # deepspeed.init_distributed) to keep this test short.
    world_info = base64.urlsafe_b64encode(json.dumps({"localhost": [0, 1]}).encode()).decode()
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(PROBE)]
    proc = subprocess.run(cmd, env=_probe_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = sorted(_probe_lines(proc.stdout), key=lambda d: d["rank"])
    assert [(d["rank"], d["world"], d["local_world"], d["source"], d["ok"]) for d in lines] == [
        ("0", "2", "2", "deepspeed", "1"), ("1", "2", "2", "deepspeed", "1")], proc.stdout + proc.stderr
