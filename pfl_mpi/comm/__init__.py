"""Communication: the only package that imports mpi4py (in mpi_world.py)."""

from .launch import make_world, mpiexec_path, relaunch_command, under_mpi
from .ledger import ALGORITHM_LABELS, FIELDS, LABELS, Ledger
from .world import SERVER, World

__all__ = [
    "ALGORITHM_LABELS",
    "FIELDS",
    "LABELS",
    "SERVER",
    "Ledger",
    "World",
    "make_world",
    "mpiexec_path",
    "relaunch_command",
    "under_mpi",
]
