"""Federated data: data sets, partitioners and per-client materialisation. See docs/data.md.

Names are imported on first use, so that reading the configuration schema (``DataConfig``) does not import
torch or the data-set loaders (``pfl-mpi slurm`` writes a script without them)."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pfl_mpi.data.config import DataConfig, Mnist1dConfig, SyntheticConfig
    from pfl_mpi.data.federated import ClientData, FederatedData, load_federated

_HOME = {
    "DataConfig": "config",
    "Mnist1dConfig": "config",
    "SyntheticConfig": "config",
    "ClientData": "federated",
    "FederatedData": "federated",
    "load_federated": "federated",
}
__all__ = ["ClientData", "DataConfig", "FederatedData", "Mnist1dConfig", "SyntheticConfig", "load_federated"]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOME[name]}"), name)
