"""FedGKT's server model: a ReLU MLP on the clients' features (docs/algorithms.md#fedgkt)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def server_mlp(feature_dim: int, hidden: Sequence[int], num_classes: int, seed: int) -> nn.Sequential:
    """Linear+ReLU per width of ``hidden``, then a Linear to ``num_classes``; torch's default initialisation drawn
    from ``seed`` alone (the global random state is left as it was)."""
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        width = feature_dim
        for w in hidden:
            layers += [nn.Linear(width, w), nn.ReLU()]
            width = w
        layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
