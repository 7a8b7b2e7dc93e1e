"""The SLURM side of rank discovery (`roberta_ds.dist`): an `srun` step's variables -> rank, world, rendezvous.

Read only when SLURM_STEP_NUM_TASKS is set (the batch script itself has SLURM_PROCID=0 but no step
variables) and OMPI_COMM_WORLD_SIZE is not (children of `mpirun` inside an allocation inherit the
batch step's SLURM_PROCID=0). Rank 0's host is the first of SLURM_STEP_NODELIST (expanded with
`scontrol show hostnames` when it is a list); the port is derived from the job and step ids.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from roberta_ds.errors import ConfigError

SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 12000
"""Derived SLURM ports lie in [20000, 32000): below Linux's ephemeral range (32768-60999), so an
outgoing connection on the master node cannot already hold the port."""


@dataclass(frozen=True)
class Place:
    """A process's place in a job and the job's rendezvous (what an srun step gives each task;
    launch/dist.DistEnv adds where it was read from)."""

    rank: int
    """Global rank, 0 <= rank < world_size."""
    world_size: int
    local_rank: int
    """Rank among the processes on this node (selects the GPU)."""
    local_world_size: int
    master_addr: str
    """Host of rank 0, where torch.distributed's TCPStore listens."""
    master_port: int


def env_int(environ: Mapping[str, str], name: str) -> int:
    """An integer environment variable, or a ConfigError naming it."""
    value = environ.get(name)
    if value is None:
        raise ConfigError(f"{name} is not set")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None



def parse_tasks_per_node(value: str) -> list[int]:
    """Expand SLURM's compressed tasks-per-node list: '2(x3),1' -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ConfigError(f"cannot parse SLURM tasks-per-node list {value!r} (expected e.g. '2(x3),1')")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def slurm_port(job_id: int, step_id: int = 0) -> int:
    """Rendezvous port for an srun step: the same on every task, different for nearby jobs and steps.

    20000 + (7 * job_id + step_id) % 12000. 7 is coprime to 12000, so any 12000 consecutive job ids
    get distinct ports, and steps 0-6 of a job collide neither with each other nor with the next
    job's. MASTER_PORT in the environment overrides it.
    """
    return SLURM_PORT_BASE + (7 * job_id + step_id) % SLURM_PORT_SPAN


def scontrol_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist ('node[01-03],gpu7') with `scontrol show hostnames`."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout
    except FileNotFoundError:
        raise ConfigError(
            f"scontrol is not on PATH, so SLURM_STEP_NODELIST={nodelist!r} cannot be expanded: "
            "set MASTER_ADDR to the first node's hostname"
        ) from None
    except subprocess.CalledProcessError as e:
        raise ConfigError(f"`scontrol show hostnames {nodelist}` failed: {e.stderr.strip()}") from None
    hosts = out.split()
    if not hosts:
        raise ConfigError(f"`scontrol show hostnames {nodelist}` printed no hosts")
    return hosts


def is_plain_hostname(nodelist: str) -> bool:
    """A one-node list needs no expansion ('vm', not 'n[1-2]' or 'a,b')."""
    return bool(nodelist) and not any(c in nodelist for c in "[],")


def slurm_step_applies(environ: Mapping[str, str]) -> tuple[bool, str]:
    """(True, "") if the SLURM step variables describe this process's world, else (False, why)."""
    if "SLURM_STEP_NUM_TASKS" not in environ:
        return False, ""
    if "OMPI_COMM_WORLD_SIZE" in environ:
        return False, ("ignoring SLURM_* variables: OMPI_COMM_WORLD_SIZE is set (processes of mpirun "
                       "inherit SLURM_PROCID from the step or batch script that ran mpirun)")
    pmi_size, pmi_rank = environ.get("PMI_SIZE"), environ.get("PMI_RANK")
    if pmi_size is not None and pmi_size != environ["SLURM_STEP_NUM_TASKS"]:
        # MPICH's mpiexec (hydra) starts one proxy per node with srun: the step's tasks are the
        # proxies, PMI_SIZE the MPI world. Decided on sizes, so every rank takes the same path.
        return False, (f"ignoring SLURM_* variables: PMI_SIZE={pmi_size} differs from SLURM_STEP_NUM_TASKS="
                       f"{environ['SLURM_STEP_NUM_TASKS']} (an MPI launcher inside the step)")
    if pmi_rank is not None and pmi_rank != environ.get("SLURM_PROCID"):
        raise ConfigError(
            f"contradictory environment: PMI_RANK={pmi_rank} but SLURM_PROCID={environ.get('SLURM_PROCID')} "
            f"in a step of SLURM_STEP_NUM_TASKS={environ['SLURM_STEP_NUM_TASKS']} = PMI_SIZE tasks: the MPI "
            "launcher numbers ranks differently from srun; launch with `srun --mpi=pmi2|pmix` directly, "
            "or with mpiexec outside srun"
        )
    return True, ""


def slurm_place(environ: Mapping[str, str], hostnames: Callable[[str], list[str]]) -> Place:
    """This task's place in its srun step (call only when `slurm_step_applies`)."""
    missing = [v for v in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_ID") if v not in environ]
    if missing:
        raise ConfigError(f"SLURM_STEP_NUM_TASKS is set but {', '.join(missing)} not: not a normal srun step")
    rank, world = env_int(environ, "SLURM_PROCID"), env_int(environ, "SLURM_STEP_NUM_TASKS")
    local_rank = env_int(environ, "SLURM_LOCALID")
    if not 0 <= rank < world:
        raise ConfigError(f"SLURM_PROCID={rank} is not below SLURM_STEP_NUM_TASKS={world}")

    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        raise ConfigError("SLURM_STEP_NODELIST (and SLURM_JOB_NODELIST) is empty: cannot find rank 0's node")
    hosts: list[str] | None = None
    if "MASTER_ADDR" in environ:
        master = environ["MASTER_ADDR"]
    elif is_plain_hostname(nodelist):
        master = nodelist
    else:
        hosts = hostnames(nodelist)
        master = hosts[0]

    # Tasks on this node: SLURM_STEP_TASKS_PER_NODE lists them per node of the step, in nodelist order.
    per_node = parse_tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE")
                                    or environ.get("SLURM_TASKS_PER_NODE") or str(world))
    if len(per_node) == 1:
        node_index = 0
    else:
        here = environ.get("SLURMD_NODENAME")
        hosts = hosts if hosts is not None else hostnames(nodelist)
        if here in hosts:
            node_index = hosts.index(here)
        else:
            node_index = env_int(environ, "SLURM_NODEID")
        if node_index >= len(per_node):
            raise ConfigError(f"node index {node_index} is outside the tasks-per-node list {per_node}")
    local_world = per_node[node_index]

    if "MASTER_PORT" in environ:
        port = env_int(environ, "MASTER_PORT")
    else:
        step_id = environ.get("SLURM_STEP_ID") or environ.get("SLURM_STEPID") or "0"
        port = slurm_port(env_int(environ, "SLURM_JOB_ID"), int(step_id) if step_id.isdigit() else 0)
    return Place(rank, world, local_rank, local_world, master, port)
