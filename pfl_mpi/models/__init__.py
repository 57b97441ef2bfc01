"""Target networks with a base/head split, and flat parameter layouts."""

from pfl_mpi.models.config import ArchitectureConfig, ModelConfig
from pfl_mpi.models.nets import SplitModel, build_model, build_models
from pfl_mpi.models.params import ParamLayout, split_names

__all__ = [
    "ArchitectureConfig",
    "ModelConfig",
    "ParamLayout",
    "SplitModel",
    "build_model",
    "build_models",
    "split_names",
]
