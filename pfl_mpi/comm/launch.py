"""Starting the job: are we under mpiexec already, and if not, how to start ourselves under it."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from .world import POLL_MAX_MS

# Variables that MPICH's Hydra, Open MPI/PRRTE, Intel MPI and srun (PMI-2/PMIx) set in every rank.
_RANK_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID")


def under_mpi() -> bool:
    """True when this process was started by an MPI launcher (or PFL_MPI_FORCE_MPI=1)."""
    if os.environ.get("PFL_MPI_FORCE_MPI") == "1":
        return True
    return any(name in os.environ for name in _RANK_VARIABLES)


def mpiexec_path() -> str:
    """The venv's own mpiexec (never a system one that may belong to another MPI), else the PATH's."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec")
    if found is None:
        raise FileNotFoundError("no mpiexec found beside the Python interpreter or on PATH; install the 'mpi' extra")
    return found


def relaunch_command(n: int, module_args: list[str]) -> list[str]:
    """The command that runs ``python -m pfl_mpi <module_args>`` on ``n`` ranks."""
    return [mpiexec_path(), "-n", str(n), sys.executable, "-m", "pfl_mpi", *module_args]


def make_world(poll_max: float = POLL_MAX_MS / 1000, wait: str = "polled"):
    """The world of this process: MPI ranks under a launcher, a single process otherwise.

    ``poll_max`` (seconds) and ``wait`` say how a rank completes a collective (see ``MPIWorld``)."""
    if under_mpi():
        from .mpi_world import MPIWorld

        return MPIWorld(poll_max=poll_max, wait=wait)
    from .serial import SerialWorld

    return SerialWorld()
