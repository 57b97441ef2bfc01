"""Where a rank computes: a GPU chosen by node-local rank, else the CPU."""

from __future__ import annotations

import os

import torch

from ..errors import ConfigError


def select_device(choice: str, local_rank: int) -> torch.device:
    """``auto``: cuda:(local_rank mod visible GPUs) when any GPU is visible, else cpu."""
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if choice == "cuda":
        raise ConfigError("device", "cuda was asked for but this rank sees no GPU")
    return torch.device("cpu")


def ranks_per_device(device: torch.device, local_size: int) -> int:
    """How many of this node's ``local_size`` ranks ``select_device`` binds to ``device`` at most (a GPU shared by
    several ranks: each one's ``auto`` block gets that share of its memory); 1 on the CPU."""
    if device.type != "cuda":
        return 1
    return -(-local_size // torch.cuda.device_count())


def set_threads(threads: int) -> None:
    """Pin torch (and OpenMP libraries started later) to ``threads`` threads on this rank."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
