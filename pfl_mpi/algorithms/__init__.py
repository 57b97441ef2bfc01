"""Algorithms, one file each, registered by name.

Every module of the package that is not a support module holds algorithms and is imported the first
time the registry is asked for a name (``resolve``, ``algorithm_names``), so a new algorithm is one new
file and nothing else. The other names are imported on first use: the configuration schema reads
``pfl_mpi.training.config`` without importing torch."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_FROM_REGISTRY = {"algorithm_names", "register", "resolve"}
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


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module(f"{__name__}.{'registry' if name in _FROM_REGISTRY else 'base'}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
