"""Target networks with a base/head split, and flat parameter layouts."""

from pfl_mpi.models.config import ModelConfig
from pfl_mpi.models.nets import SplitModel, build_model
from pfl_mpi.models.params import ParamLayout, split_names

__all__ = ["ModelConfig", "ParamLayout", "SplitModel", "build_model", "split_names"]
