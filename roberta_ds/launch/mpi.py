"""The MPI side of rank discovery (`roberta_ds.dist`): mpi4py communicators, rank 0's rendezvous offer.

Used when an MPI launcher started the processes (`mpirun`, MPICH's hydra) and for the cross-check
under `srun --mpi=pmix|pmi2`. mpi4py is an optional extra (`roberta-ds[mpi]`) and is imported only
here, lazily: importing it calls MPI_Init. With a PMI mode its library does not speak, MPI silently
gives every process a world of its own, so every reading here compares mpi4py's world size with the
size the launcher promised.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from roberta_ds.errors import ConfigError

log = logging.getLogger("roberta_ds.dist")

MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK")
"""Variables that only an MPI launcher sets (OpenMPI's mpirun, MPICH/hydra, srun --mpi=pmi2/pmix)."""


class Comm(Protocol):
    """The part of an mpi4py communicator discovery uses."""

    def Get_rank(self) -> int: ...  # mpi4py's method names
    def Get_size(self) -> int: ...
    def bcast(self, obj: Any, root: int = 0) -> Any: ...


MpiCommFactory = Callable[[], "tuple[Comm, Comm]"]
"""Returns (COMM_WORLD, the node-local communicator). Injected by unit tests."""


@dataclass(frozen=True)
class MpiPlace:
    """This process's place in COMM_WORLD and the rendezvous rank 0 offered."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    master_addr: str
    master_port: int


def mpi4py_comms() -> tuple[Comm, Comm]:
    """COMM_WORLD and its shared-memory (node-local) split, from mpi4py (initialises MPI)."""
    hint = ("install one (e.g. Debian's openmpi-bin libopenmpi-dev) or the `mpich` wheel")
    try:
        from mpi4py import MPI  # lazy: an optional extra, and importing it calls MPI_Init
    except ImportError as e:
        if getattr(e, "name", None) == "mpi4py" or "No module named" in str(e):
            raise ConfigError(
                "this process was started by an MPI launcher (OMPI_COMM_WORLD_*/PMI_* variables) but "
                "mpi4py is not installed: `pip install roberta-ds[mpi]` (mpi4py), or launch with "
                "torchrun, the deepspeed launcher or srun"
            ) from None
        raise ConfigError(f"mpi4py cannot load an MPI library ({e}): {hint}") from None
    except RuntimeError as e:  # mpi4py wheels load libmpi at import time
        raise ConfigError(f"mpi4py cannot load an MPI library ({e}): {hint}") from None
    world = MPI.COMM_WORLD
    local = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    return world, local


def finalize() -> None:
    """MPI_Finalize, if this process initialised MPI (imported mpi4py) and has not finalised it. mpi4py
    does it at interpreter finalization, which a finished run skips (`train._exit_after_run`); without
    it mpirun reports the rank as "exiting improperly" and fails the job."""
    import sys

    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def mpi_place(comms: MpiCommFactory, promised: tuple[str, int] | None, *, master_addr: str | None,
              master_port: int | None, hostname: Callable[[], str]) -> MpiPlace:
    """Rank, size and node-local rank from MPI; rank 0's host (or `master_addr`) and a free port (or
    `master_port`) broadcast to all. `promised` is (variable, size) from the launcher's environment."""
    world, local = comms()
    rank, size = world.Get_rank(), world.Get_size()
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
        offer = (master_addr or hostname(), master_port if master_port is not None else free_port())
    addr, port = world.bcast(offer, root=0)
    return MpiPlace(rank, size, local.Get_rank(), local.Get_size(), str(addr), int(port))


def mpi_agrees(rank: int, size: int, comms: MpiCommFactory) -> int | None:
    """Under srun --mpi=pmix/pmi2 with MPI in use: MPI must see the srun step's world.

    Returns mpi4py's world size (equal to `size`), or None when MPI cannot be loaded (nothing to
    compare: the step's variables stand). Raises ConfigError when MPI sees another world.
    """
    try:
        world, _ = comms()
    except ConfigError as e:
        log.info("srun step with PMI variables; skipping the mpi4py cross-check (%s)", e)
        return None
    mpi_size, mpi_rank = world.Get_size(), world.Get_rank()
    if mpi_size != size or mpi_rank != rank:
        raise ConfigError(
            f"srun step says rank {rank} of SLURM_STEP_NUM_TASKS={size}, but mpi4py says "
            f"rank {mpi_rank} of {mpi_size}: the step's --mpi= plugin does not match the MPI "
            "library mpi4py uses (OpenMPI needs srun --mpi=pmix, MPICH --mpi=pmi2), so each process "
            "is its own MPI world. Fix the --mpi= flag or set ROBERTA_DS_MPI=0 if MPI is not needed"
        )
    log.info("mpi4py agrees with the srun step: rank %d of %d", rank, mpi_size)
    return mpi_size
