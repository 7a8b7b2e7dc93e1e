"""Who am I: rank, world size, local rank and rendezvous address, from whichever launcher started us.

`discover()` looks at the process environment, in this order, and uses the first that applies:

1. torchrun / the DeepSpeed launcher / a hand-set environment: RANK, WORLD_SIZE, LOCAL_RANK,
   MASTER_ADDR, MASTER_PORT (source "torchrun" if TORCHELASTIC_RUN_ID is set, "deepspeed" if the
   DeepSpeed launcher's CROSS_RANK/LOCAL_SIZE are, else "env").
2. An `srun` step: SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, the first host of
   SLURM_STEP_NODELIST (`scontrol show hostnames`), a port derived from the job id (`slurm_port`).
   Only when SLURM_STEP_NUM_TASKS is set (the batch script itself has SLURM_PROCID=0 but no step
   variables) and OMPI_COMM_WORLD_SIZE is not (children of `mpirun` inside an allocation inherit the
   batch step's SLURM_PROCID=0). Under `srun --mpi=pmix|pmi2`, if MPI is in use, mpi4py's world
   size must equal the step's.
3. MPI (`mpirun`, MPICH's hydra, ...): OMPI_COMM_WORLD_*, PMI_* or PMIX_RANK present. mpi4py
   (optional extra `roberta-ds[mpi]`, imported lazily) gives rank and size; the node-local rank
   comes from splitting COMM_WORLD by shared memory; rank 0 broadcasts its hostname and a free port.
4. Nothing: a single process (rank 0 of 1).

Contradictions are refused with a `ConfigError` naming the variables, e.g. RANK exported in a batch
script (where SLURM_PROCID is 0) and inherited by every task of the `srun` step. After
`init_process_group`, `check_world()` compares the world torch.distributed built with what the
launcher promised (`expected_world_size`): a wrong PMI setting silently makes N one-process worlds.

Typical use (train.py):
    expected = expected_world_size()       # what the launcher promised
    env = discover(); export_env(env)      # RANK, WORLD_SIZE, ... for env:// initialisation
    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False)
    check_world(env, torch.distributed.get_world_size(), expected)
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from roberta_ds.errors import ConfigError

log = logging.getLogger(__name__)

SOURCES = ("torchrun", "deepspeed", "env", "slurm", "mpi", "single")
DEFAULT_PORT = 29500
"""MASTER_PORT for a single process or an environment that names no port (torch's default)."""
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 12000
"""Derived SLURM ports lie in [20000, 32000): below Linux's ephemeral range (32768-60999), so an
outgoing connection on the master node cannot already hold the port."""

# Variables that only an MPI launcher sets (OpenMPI's mpirun, MPICH/hydra, srun --mpi=pmi2/pmix).
_MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job; `export_env` turns it into torch's env:// variables."""

    rank: int
    """Global rank, 0 <= rank < world_size."""
    world_size: int
    local_rank: int
    """Rank among the processes on this node (selects the GPU)."""
    local_world_size: int
    master_addr: str
    """Host of rank 0, where torch.distributed's TCPStore listens."""
    master_port: int
    source: str
    """Which launcher's variables were used: one of SOURCES."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"DistEnv.source: {self.source!r} is not one of {SOURCES}")
        if not (self.world_size >= 1 and 0 <= self.rank < self.world_size):
            raise ConfigError(f"rank {self.rank} is outside world size {self.world_size} ({self.source})")
        if not (self.local_world_size >= 1 and 0 <= self.local_rank < self.local_world_size):
            raise ConfigError(
                f"local rank {self.local_rank} is outside local world size {self.local_world_size} "
                f"({self.source})"
            )
        if not 0 < self.master_port < 65536:
            raise ConfigError(f"MASTER_PORT {self.master_port} is not a TCP port (1-65535)")


class Comm(Protocol):
    """The part of an mpi4py communicator discovery uses."""

    def Get_rank(self) -> int: ...  # noqa: N802 (mpi4py's names)
    def Get_size(self) -> int: ...  # noqa: N802
    def bcast(self, obj: Any, root: int = 0) -> Any: ...


MpiCommFactory = Callable[[], "tuple[Comm, Comm]"]
"""Returns (COMM_WORLD, the node-local communicator). Injected by unit tests."""


# ---------------------------------------------------------------------------------------------------
# Small parsers (pure)


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name)
    if value is None:
        raise ConfigError(f"{name} is not set")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None


def _port_or_default(environ: Mapping[str, str]) -> int:
    return _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else DEFAULT_PORT


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


def _is_plain_hostname(nodelist: str) -> bool:
    """A one-node list needs no expansion ('vm', not 'n[1-2]' or 'a,b')."""
    return bool(nodelist) and not any(c in nodelist for c in "[],")


# ---------------------------------------------------------------------------------------------------
# Each launcher's reading


def _outer_launcher(environ: Mapping[str, str]) -> tuple[str, int, int] | None:
    """(variables, rank, size) of the process launcher outside any torch-style env, if one is visible."""
    if "OMPI_COMM_WORLD_SIZE" in environ and "OMPI_COMM_WORLD_RANK" in environ:
        return ("OMPI_COMM_WORLD_RANK/SIZE", _int(environ, "OMPI_COMM_WORLD_RANK"),
                _int(environ, "OMPI_COMM_WORLD_SIZE"))
    if "PMI_RANK" in environ and "PMI_SIZE" in environ:
        return ("PMI_RANK/PMI_SIZE", _int(environ, "PMI_RANK"), _int(environ, "PMI_SIZE"))
    if "SLURM_STEP_NUM_TASKS" in environ and "SLURM_PROCID" in environ:
        return ("SLURM_PROCID/SLURM_STEP_NUM_TASKS", _int(environ, "SLURM_PROCID"),
                _int(environ, "SLURM_STEP_NUM_TASKS"))
    return None


def _torch_launcher(environ: Mapping[str, str]) -> str:
    """Who set RANK: "torchrun" (TORCHELASTIC_* markers), "deepspeed" (its launcher's CROSS_RANK and
    LOCAL_SIZE) or "env" (by hand, a wrapper script, or an earlier export_env)."""
    if "TORCHELASTIC_RUN_ID" in environ or "TORCHELASTIC_RESTART_COUNT" in environ:
        return "torchrun"
    if "CROSS_RANK" in environ and "LOCAL_SIZE" in environ:
        return "deepspeed"
    return "env"


def _from_torch_env(environ: Mapping[str, str]) -> DistEnv:
    """torchrun, `deepspeed` (launcher), or RANK/WORLD_SIZE set by hand or by an earlier export_env."""
    source = _torch_launcher(environ)
    missing = [v for v in ("WORLD_SIZE", "LOCAL_RANK") if v not in environ]
    if missing:
        raise ConfigError(
            f"RANK={environ['RANK']} is set but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: set RANK, WORLD_SIZE and LOCAL_RANK together "
            "(torchrun and the deepspeed launcher do), or unset RANK to let roberta-ds discover them "
            "from SLURM or MPI"
        )
    rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
    local_rank = _int(environ, "LOCAL_RANK")
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is not below WORLD_SIZE={world}")

    outer = _outer_launcher(environ)
    if source == "env" and outer is not None:
        names, o_rank, o_size = outer
        # Nobody started these processes with per-process RANKs: the values must have been
        # inherited (e.g. `export RANK=$SLURM_PROCID` in the batch script, where SLURM_PROCID is 0).
        if (world == o_size and rank != o_rank) or world < o_size:
            raise ConfigError(
                f"contradictory environment: RANK={rank} WORLD_SIZE={world}, but {names} say rank "
                f"{o_rank} of {o_size}. RANK/WORLD_SIZE were probably exported before the launcher "
                "started the processes (every task inherits the same values; a batch script has "
                "SLURM_PROCID=0). Unset RANK, WORLD_SIZE, LOCAL_RANK (roberta-ds derives them from the "
                "launcher) or set them per process, as torchrun does"
            )

    if "LOCAL_WORLD_SIZE" in environ:
        local_world = _int(environ, "LOCAL_WORLD_SIZE")
    elif "LOCAL_SIZE" in environ:  # the deepspeed launcher's name
        local_world = _int(environ, "LOCAL_SIZE")
    else:
        local_world = world
        log.info("LOCAL_WORLD_SIZE not set: assuming all %d processes share one node", world)
    if world > 1 and ("MASTER_ADDR" not in environ or "MASTER_PORT" not in environ):
        raise ConfigError(
            f"RANK/WORLD_SIZE are set (world {world}) but MASTER_ADDR and MASTER_PORT are not both set: "
            "set them to rank 0's host and a free port"
        )
    return DistEnv(
        rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
        master_addr=environ.get("MASTER_ADDR", "127.0.0.1"), master_port=_port_or_default(environ),
        source=source,
    )


def _slurm_step_applies(environ: Mapping[str, str]) -> tuple[bool, str]:
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


def _from_slurm(
    environ: Mapping[str, str], hostnames: Callable[[str], list[str]]
) -> DistEnv:
    missing = [v for v in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_ID") if v not in environ]
    if missing:
        raise ConfigError(f"SLURM_STEP_NUM_TASKS is set but {', '.join(missing)} not: not a normal srun step")
    rank, world = _int(environ, "SLURM_PROCID"), _int(environ, "SLURM_STEP_NUM_TASKS")
    local_rank = _int(environ, "SLURM_LOCALID")
    if not 0 <= rank < world:
        raise ConfigError(f"SLURM_PROCID={rank} is not below SLURM_STEP_NUM_TASKS={world}")

    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        raise ConfigError("SLURM_STEP_NODELIST (and SLURM_JOB_NODELIST) is empty: cannot find rank 0's node")
    hosts: list[str] | None = None
    if "MASTER_ADDR" in environ:
        master = environ["MASTER_ADDR"]
    elif _is_plain_hostname(nodelist):
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
            node_index = _int(environ, "SLURM_NODEID")
        if node_index >= len(per_node):
            raise ConfigError(f"node index {node_index} is outside the tasks-per-node list {per_node}")
    local_world = per_node[node_index]

    if "MASTER_PORT" in environ:
        port = _int(environ, "MASTER_PORT")
    else:
        step_id = environ.get("SLURM_STEP_ID") or environ.get("SLURM_STEPID") or "0"
        port = slurm_port(_int(environ, "SLURM_JOB_ID"), int(step_id) if step_id.isdigit() else 0)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                   master_addr=master, master_port=port, source="slurm")


def _mpi4py_comms() -> tuple[Comm, Comm]:
    """COMM_WORLD and its shared-memory (node-local) split, from mpi4py (initialises MPI)."""
    try:
        from mpi4py import MPI  # lazy: an optional extra, and importing it calls MPI_Init
    except ImportError as e:
        if getattr(e, "name", None) == "mpi4py" or "No module named" in str(e):
            raise ConfigError(
                "this process was started by an MPI launcher (OMPI_COMM_WORLD_*/PMI_* variables) but "
                "mpi4py is not installed: `pip install roberta-ds[mpi]` (mpi4py), or launch with "
                "torchrun, the deepspeed launcher or srun"
            ) from None
        raise ConfigError(f"mpi4py cannot load an MPI library ({e}): install one (e.g. Debian's "
                          "openmpi-bin libopenmpi-dev) or the `mpich` wheel") from None
    except RuntimeError as e:  # mpi4py wheels load libmpi at import time
        raise ConfigError(f"mpi4py cannot load an MPI library ({e}): install one (e.g. Debian's "
                          "openmpi-bin libopenmpi-dev) or the `mpich` wheel") from None
    world = MPI.COMM_WORLD
    local = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    return world, local


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _from_mpi(environ: Mapping[str, str], comms: MpiCommFactory) -> DistEnv:
    world, local = comms()
    rank, size = world.Get_rank(), world.Get_size()
    promised = _mpi_promised_size(environ)
    if promised is not None and size != promised[1]:
        raise ConfigError(
            f"MPI world size mismatch: {promised[0]}={promised[1]} but mpi4py's COMM_WORLD has {size} "
            "process(es). mpi4py's MPI library is not the one that launched this process (e.g. "
            "mpich's mpiexec with an OpenMPI-linked mpi4py, or srun with the wrong --mpi=): each "
            "process then runs alone. Launch with the matching mpirun, or srun --mpi=pmix (OpenMPI) "
            "/ --mpi=pmi2 (MPICH)"
        )
    # Rank 0 chooses the rendezvous; every rank takes part in the broadcast (a collective).
    offer = None
    if rank == 0:
        offer = (environ.get("MASTER_ADDR") or socket.gethostname(),
                 int(environ["MASTER_PORT"]) if "MASTER_PORT" in environ else _free_port())
    addr, port = world.bcast(offer, root=0)
    return DistEnv(rank=rank, world_size=size, local_rank=local.Get_rank(), local_world_size=local.Get_size(),
                   master_addr=str(addr), master_port=int(port), source="mpi")


def _mpi_promised_size(environ: Mapping[str, str]) -> tuple[str, int] | None:
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if name in environ:
            return name, _int(environ, name)
    return None


def _check_mpi_agrees(env: DistEnv, environ: Mapping[str, str], comms: MpiCommFactory) -> None:
    """Under srun --mpi=pmix/pmi2 with MPI in use: MPI must see the same world as the SLURM step."""
    try:
        world, _ = comms()
    except ConfigError as e:
        log.info("srun step with PMI variables; skipping the mpi4py cross-check (%s)", e)
        return
    size = world.Get_size()
    if size != env.world_size or world.Get_rank() != env.rank:
        raise ConfigError(
            f"srun step says rank {env.rank} of SLURM_STEP_NUM_TASKS={env.world_size}, but mpi4py says "
            f"rank {world.Get_rank()} of {size}: the step's --mpi= plugin does not match the MPI "
            "library mpi4py uses (OpenMPI needs srun --mpi=pmix, MPICH --mpi=pmi2), so each process "
            "is its own MPI world. Fix the --mpi= flag or set ROBERTA_DS_MPI=0 if MPI is not needed"
        )
    log.info("mpi4py agrees with the srun step: rank %d of %d", env.rank, size)


# ---------------------------------------------------------------------------------------------------
# Public API


def discover(
    environ: Mapping[str, str] | None = None,
    *,
    use_mpi: bool = True,
    hostnames: Callable[[str], list[str]] = scontrol_hostnames,
    mpi_comm_factory: MpiCommFactory | None = None,
) -> DistEnv:
    """Rank, world size, local rank and rendezvous of this process (see the module docstring).

    environ defaults to os.environ and is not modified. `hostnames` expands a SLURM nodelist;
    `mpi_comm_factory` returns (COMM_WORLD, node-local comm) and is only called on the MPI path or for
    the srun+PMI cross-check (default: mpi4py). use_mpi=False, or ROBERTA_DS_MPI=0 in the
    environment, never touches MPI (an MPI launch is then an error).
    """
    environ = os.environ if environ is None else environ
    comms = mpi_comm_factory or _mpi4py_comms
    use_mpi = use_mpi and environ.get("ROBERTA_DS_MPI", "1") != "0"

    if "RANK" in environ:
        env = _from_torch_env(environ)
    else:
        applies, why = _slurm_step_applies(environ)
        if why:
            log.info(why)
        mpi_launch = any(v in environ for v in _MPI_MARKERS)
        if applies:
            env = _from_slurm(environ, hostnames)
            if use_mpi and any(v in environ for v in ("PMIX_RANK", "PMI_RANK")):
                _check_mpi_agrees(env, environ, comms)
        elif mpi_launch:
            if not use_mpi:
                raise ConfigError(
                    "started by an MPI launcher (" + ", ".join(v for v in _MPI_MARKERS if v in environ)
                    + ") but MPI discovery is off (use_mpi=False or ROBERTA_DS_MPI=0): launch with "
                    "torchrun, the deepspeed launcher or srun, or allow MPI"
                )
            env = _from_mpi(environ, comms)
        else:
            env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1,
                          master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
                          master_port=_port_or_default(environ), source="single")
    log.info("distributed environment: %s", log_source(env))
    return env


def export_env(env: DistEnv) -> None:
    """Set torch's env:// variables so `init_process_group("env://")` and
    `deepspeed.init_distributed(..., auto_mpi_discovery=False)` build exactly this world."""
    os.environ.update({
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size),
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    })


def expected_world_size(environ: Mapping[str, str] | None = None) -> int | None:
    """The world size the launcher promised, or None if nothing promised one.

    In order: ROBERTA_DS_EXPECT_WORLD_SIZE (explicit); WORLD_SIZE if torchrun or the deepspeed
    launcher set it; OMPI_COMM_WORLD_SIZE / PMI_SIZE (MPI launchers); SLURM_STEP_NUM_TASKS (an srun
    step, unless mpirun started us); SLURM_NTASKS inside a job but outside any step (the job asked for
    that many tasks, so a lone process means `srun` was forgotten); a hand-set WORLD_SIZE.
    The launchers' own variables come before a plain WORLD_SIZE, so the answer is the same before and
    after `export_env`.
    """
    environ = os.environ if environ is None else environ
    if environ.get("ROBERTA_DS_EXPECT_WORLD_SIZE"):
        return _int(environ, "ROBERTA_DS_EXPECT_WORLD_SIZE")
    if environ.get("WORLD_SIZE") and _torch_launcher(environ) != "env":
        return _int(environ, "WORLD_SIZE")
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if environ.get(name):
            return _int(environ, name)
    applies, _ = _slurm_step_applies(environ)
    if applies:
        return _int(environ, "SLURM_STEP_NUM_TASKS")
    if environ.get("SLURM_NTASKS") and "SLURM_STEP_NUM_TASKS" not in environ:
        return _int(environ, "SLURM_NTASKS")
    if environ.get("WORLD_SIZE"):
        return _int(environ, "WORLD_SIZE")
    return None


def check_world(env: DistEnv, actual_world_size: int, expected: int | None) -> None:
    """Refuse a world that differs from discovery's or from the launcher's promise, saying why."""
    if actual_world_size != env.world_size:
        raise ConfigError(
            f"torch.distributed built a world of {actual_world_size} but discovery ({env.source}) "
            f"found {env.world_size}: something re-initialised the process group from other "
            "variables (call export_env(env) before init, and init DeepSpeed with "
            "auto_mpi_discovery=False)"
        )
    if expected is None or expected == actual_world_size:
        return
    if actual_world_size == 1 and expected > 1:
        cause = (
            f"each of the {expected} processes is alone in a world of 1. Usual causes: MPI launched "
            "with a PMI mode its library does not speak (OpenMPI needs `srun --mpi=pmix`, MPICH "
            "`--mpi=pmi2`), or the script ran in the batch shell without `srun` (SLURM_NTASKS set, "
            "no step)"
        )
    else:
        cause = (
            "the launcher's variables do not describe this run (stale WORLD_SIZE/RANK exported by "
            "hand, or a wrapper that starts a different number of processes)"
        )
    raise ConfigError(
        f"world size {actual_world_size} but the launcher promised {expected} "
        f"(ROBERTA_DS_EXPECT_WORLD_SIZE/WORLD_SIZE/SLURM_STEP_NUM_TASKS/SLURM_NTASKS/"
        f"OMPI_COMM_WORLD_SIZE/PMI_SIZE): {cause}. Set ROBERTA_DS_EXPECT_WORLD_SIZE if the promise is wrong"
    )


def log_source(env: DistEnv) -> str:
    """One line: 'rank 1/2 (local 1/2) from slurm; rendezvous vm:21234'."""
    return (f"rank {env.rank}/{env.world_size} (local {env.local_rank}/{env.local_world_size}) "
            f"from {env.source}; rendezvous {env.master_addr}:{env.master_port}")


def _global_rank() -> int:
    tdist = sys.modules.get("torch.distributed")  # do not import torch just to print
    if tdist is not None and tdist.is_available() and tdist.is_initialized():
        return int(tdist.get_rank())
    return int(os.environ.get("RANK", "0") or 0)


def print0(*args: Any, env: DistEnv | None = None, **kwargs: Any) -> None:
    """print() on global rank 0 only (rank from `env`, else torch.distributed, else $RANK)."""
    rank = env.rank if env is not None else _global_rank()
    if rank == 0:
        # One write per call: with PYTHONUNBUFFERED, print() writes text and end separately, and
        # other ranks' log lines in the same pipe can land in between.
        sep, end = kwargs.pop("sep", " "), kwargs.pop("end", "\n")
        file, flush = kwargs.pop("file", None) or sys.stdout, kwargs.pop("flush", True)
        if kwargs:
            raise TypeError(f"print0() got unexpected keyword arguments {sorted(kwargs)}")
        file.write((" " if sep is None else sep).join(map(str, args)) + ("\n" if end is None else end))
        if flush:
            file.flush()
