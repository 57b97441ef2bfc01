"""Algorithms, one file each, registered by name. Importing this package registers the built-ins."""

from . import fedavg, fedper, local  # noqa: F401  (registration)
from .base import (
    Algorithm,
    Broadcast,
    Client,
    Collected,
    Gathered,
    PerClient,
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
    "Setup",
    "Update",
    "WeightedMean",
    "WeightedSum",
    "algorithm_names",
    "register",
    "resolve",
]
