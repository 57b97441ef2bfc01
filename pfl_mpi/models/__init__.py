"""Target networks with a base/head split, and flat parameter layouts.

Names are imported on first use, so that reading the configuration schema (``ModelConfig``) does not
import torch (``pfl-mpi slurm`` writes a script without it)."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pfl_mpi.models.config import ArchitectureConfig, ModelConfig
    from pfl_mpi.models.nets import SplitModel, build_model, build_models
    from pfl_mpi.models.params import ParamLayout, split_names

_HOME = {
    "ArchitectureConfig": "config",
    "ModelConfig": "config",
    "SplitModel": "nets",
    "build_model": "nets",
    "build_models": "nets",
    "ParamLayout": "params",
    "split_names": "params",
}
__all__ = [
    "ArchitectureConfig",
    "ModelConfig",
    "ParamLayout",
    "SplitModel",
    "build_model",
    "build_models",
    "split_names",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOME[name]}"), name)
