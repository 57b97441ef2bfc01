"""The sub-commands of ``pfl-mpi``, one module each, found by name (a new command is one new file).

A command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args, argv) -> int``
(the exit code); its docstring is the command's description.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

ORDER = (
    "run",
    "config",
    "sweep",
    "slurm",
    "info",
    "watch",
    "report",
    "export",
)  # listed first in --help; the others follow by name


def _rank(name: str) -> tuple[int, str]:
    return (ORDER.index(name), "") if name in ORDER else (len(ORDER), name)


def command_modules() -> list[ModuleType]:
    """Every command module of this package, in --help order."""
    names = sorted(
        (m.name for m in pkgutil.iter_modules(__path__)),
        key=lambda n: (n not in ORDER, ORDER.index(n) if n in ORDER else 0, n),
    )
    return [importlib.import_module(f"{__name__}.{name}") for name in names]
