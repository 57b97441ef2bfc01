"""The HDF5 run file: one writer on rank 0, a reader for everyone else."""

from .reader import (
    RunSummary,
    open_run,
    read_client_states,
    read_clients,
    read_comm,
    read_config_text,
    read_summary,
)
from .writer import RunWriter

__all__ = [
    "RunSummary",
    "RunWriter",
    "open_run",
    "read_client_states",
    "read_clients",
    "read_comm",
    "read_config_text",
    "read_summary",
]
