"""Federated data: data sets, partitioners and per-client materialisation. See docs/data.md."""

from pfl_mpi.data.config import DataConfig, Mnist1dConfig, SyntheticConfig
from pfl_mpi.data.federated import ClientData, FederatedData, load_federated

__all__ = ["ClientData", "DataConfig", "FederatedData", "Mnist1dConfig", "SyntheticConfig", "load_federated"]
