"""Target networks (built-in or your own ``nn.Module``) with a declared head, and flat parameter layouts.

Names are imported on first use, so that reading the configuration schema (``ModelConfig``) does not
import torch (``pfl-mpi slurm`` writes a script without it)."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pfl_mpi.models.config import ArchitectureConfig, ModelConfig
    from pfl_mpi.models.nets import SplitModel, build_model, build_models
    from pfl_mpi.models.params import ParamLayout, split_names
    from pfl_mpi.models.registry import register_model
    from pfl_mpi.models.split import buffer_names, head_prefixes, in_head

_HOME = {
    "ArchitectureConfig": "config",
    "ModelConfig": "config",
    "SplitModel": "nets",
    "build_model": "nets",
    "build_models": "nets",
    "ParamLayout": "params",
    "split_names": "params",
    "register_model": "registry",
    "buffer_names": "split",
    "head_prefixes": "split",
    "in_head": "split",
}
__all__ = [
    "ArchitectureConfig",
    "ModelConfig",
    "ParamLayout",
    "SplitModel",
    "build_model",
    "build_models",
    "buffer_names",
    "head_prefixes",
    "in_head",
    "register_model",
    "split_names",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOME[name]}"), name)
