"""The readers of data sets that sit on disk under ``data.root``, by ``data.name``."""

from __future__ import annotations

from pfl_mpi.data.config import DataConfig
from pfl_mpi.data.tagged import Tagged


def read_tagged(cfg: DataConfig) -> Tagged:
    """The rows, labels, splits (and client ids) of ``cfg.name`` under ``cfg.root``; x stays on disk."""
    if cfg.name in ("cifar10", "cifar100"):
        from pfl_mpi.data import cifar

        return cifar.read(cfg)
    if cfg.name in ("femnist", "shakespeare"):
        from pfl_mpi.data import leaf

        return leaf.read(cfg)
    if cfg.name == "hf":
        from pfl_mpi.data import hf

        return hf.read(cfg)
    raise ValueError(f"no reader for {cfg.name!r}")
