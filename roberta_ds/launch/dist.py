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

The SLURM and MPI readings live in `slurm.py` and `mpi.py` beside this module; import everything from here.
`python -m roberta_ds.dist` prints one process's discovery (the slurm/ templates run it first).

Typical use (engine/setup.py):
    expected = expected_world_size()       # what the launcher promised
    env = discover(); export_env(env)      # RANK, WORLD_SIZE, ... for env:// initialisation
    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False)
    check_world(env, torch.distributed.get_world_size(), expected)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from roberta_ds.errors import ConfigError
from roberta_ds.launch.mpi import (
    MPI_MARKERS,
    Comm,
    MpiCommFactory,
    free_port,
    mpi4py_comms,
    mpi_agrees,
    mpi_place,
)
from roberta_ds.launch.slurm import (
    SLURM_PORT_BASE,
    SLURM_PORT_SPAN,
    Place,
    parse_tasks_per_node,
    scontrol_hostnames,
    slurm_place,
    slurm_port,
    slurm_step_applies,
)
from roberta_ds.launch.slurm import env_int as _int

log = logging.getLogger("roberta_ds.dist")  # the name users filter on (mpi.py logs under it too)

SOURCES = ("torchrun", "deepspeed", "env", "slurm", "mpi", "single")
DEFAULT_PORT = 29500
"""MASTER_PORT for a single process or an environment that names no port (torch's default)."""

# Public names, including those that live in slurm.py / mpi.py (import them from here).
__all__ = ["DEFAULT_PORT", "SLURM_PORT_BASE", "SLURM_PORT_SPAN", "SOURCES", "Comm", "DistEnv", "MpiCommFactory",
           "check_world", "discover", "expected_world_size", "export_env", "log_source", "parse_tasks_per_node",
           "print0", "scontrol_hostnames", "slurm_port"]
_free_port = free_port  # the name tests use


@dataclass(frozen=True)
class DistEnv(Place):
    """This process's place in the job (Place's fields) and which launcher told it; `export_env` turns
    it into torch's env:// variables."""

    source: str
    """Which launcher's variables were used: one of SOURCES."""
    mpi_size: int | None = field(default=None, compare=False)
    """COMM_WORLD's size as mpi4py saw it (source "mpi", or the srun + PMI cross-check); None when MPI
    was not consulted. Shown by `log_source`, so logs say whether MPI agreed."""

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


# ---------------------------------------------------------------------------------------------------
# Small parsers (pure)


def _port_or_default(environ: Mapping[str, str]) -> int:
    return _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else DEFAULT_PORT


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


def _mpi_promised_size(environ: Mapping[str, str]) -> tuple[str, int] | None:
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if name in environ:
            return name, _int(environ, name)
    return None


def _from_mpi(environ: Mapping[str, str], comms: MpiCommFactory) -> DistEnv:
    port = _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else None
    # socket.gethostname looked up at call time: tests patch it.
    p = mpi_place(comms, _mpi_promised_size(environ), master_addr=environ.get("MASTER_ADDR") or None,
                  master_port=port, hostname=lambda: socket.gethostname())
    return DistEnv(rank=p.rank, world_size=p.size, local_rank=p.local_rank, local_world_size=p.local_size,
                   master_addr=p.master_addr, master_port=p.master_port, source="mpi", mpi_size=p.size)


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
    comms = mpi_comm_factory or mpi4py_comms
    use_mpi = use_mpi and environ.get("ROBERTA_DS_MPI", "1") != "0"

    if "RANK" in environ:
        env = _from_torch_env(environ)
    else:
        applies, why = slurm_step_applies(environ)
        if why:
            log.info(why)
        mpi_launch = any(v in environ for v in MPI_MARKERS)
        if applies:
            p = slurm_place(environ, hostnames)
            env = DistEnv(**dataclasses.asdict(p), source="slurm")
            if use_mpi and any(v in environ for v in ("PMIX_RANK", "PMI_RANK")):
                size = mpi_agrees(env.rank, env.world_size, comms)
                env = dataclasses.replace(env, mpi_size=size)
        elif mpi_launch:
            if not use_mpi:
                raise ConfigError(
                    "started by an MPI launcher (" + ", ".join(v for v in MPI_MARKERS if v in environ)
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
    applies, _ = slurm_step_applies(environ)
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
    """One line: 'rank 1/2 (local 1/2) from slurm; rendezvous vm:21234', plus ', mpi4py world 2'
    after the source when MPI was consulted."""
    mpi = f", mpi4py world {env.mpi_size}" if env.mpi_size is not None else ""
    return (f"rank {env.rank}/{env.world_size} (local {env.local_rank}/{env.local_world_size}) "
            f"from {env.source}{mpi}; rendezvous {env.master_addr}:{env.master_port}")


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


def main(argv: list[str] | None = None) -> int:
    """`python -m roberta_ds.dist`: one line per process saying what discovery finds (a launch preflight).

    Run it under the same launcher as the trainer (`srun python -m roberta_ds.dist`): every task
    prints its host, rank, world, rendezvous and the address gloo will bind, or the ConfigError that
    the trainer would stop with, without importing torch. Exit 1 on an error, when the world differs
    from the launcher's promise (e.g. a forgotten `srun`), or when the network settings cannot
    connect the nodes (`launch.net.check_network`).
    """
    if argv:
        print("usage: python -m roberta_ds.dist   (takes no arguments)", file=sys.stderr)
        return 2
    from roberta_ds.launch.net import check_network

    host = socket.gethostname()
    try:
        expected = expected_world_size()
        env = discover()
        check_world(env, env.world_size, expected)
        net = ""
        if env.world_size > 1:
            # Without torch the backend is known only in CPU mode (gloo); else only the variables set
            # (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME) are checked.
            backend = "gloo" if os.environ.get("DS_ACCELERATOR") == "cpu" else None
            net = check_network(env.local_world_size < env.world_size, env.master_addr, backend, os.environ)
    except ConfigError as e:
        print(f"[roberta-ds dist] {host}: error: {e}", file=sys.stderr, flush=True)
        return 1
    # One write(2) per line: the tasks of a step share one output stream.
    sys.stdout.flush()
    line = f"[roberta-ds dist] {host}: {log_source(env)}{'; ' + net if net else ''}\n"
    os.write(sys.stdout.fileno(), line.encode())
    return 0
