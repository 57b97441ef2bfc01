"""Algorithms, one file each, registered by name. Importing this package registers the built-ins:
every module of the package is imported, so a new algorithm is one new file and nothing else."""

import importlib
import pkgutil

from .base import (
    Algorithm,
    Broadcast,
    Client,
    Collected,
    Gathered,
    PerClient,
    Phase,
    Setup,
    Update,
    WeightedMean,
    WeightedSum,
)
from .registry import algorithm_names, register, resolve

__all__ = [
    "Algorithm",
    "Broadcast",
    "Client",
    "Collected",
    "Gathered",
    "PerClient",
    "Phase",
    "Setup",
    "Update",
    "WeightedMean",
    "WeightedSum",
    "algorithm_names",
    "register",
    "resolve",
]

# modules of this package that hold no algorithm
_SUPPORT = {"base", "registry", "training", "weighting", "server_opt", "meta", "sketch", "byzantine", "bitpack"}
_SUPPORT |= {"personal_models"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SUPPORT:
        importlib.import_module(f"{__name__}.{_module.name}")
