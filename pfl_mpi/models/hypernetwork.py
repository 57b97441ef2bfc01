"""The hypernetwork of pFedHN (Shamsian et al., ICML 2021): client embedding -> target network parameters.

``h(v; phi)``: an embedding table (one learned vector v_i per client), an MLP on the embedding (a Linear to
``hidden_dim``, then ``n_hidden`` x (ReLU, Linear(hidden_dim, hidden_dim))), and one linear head per target
tensor. The heads' outputs are concatenated in the order of the target's :class:`ParamLayout`, so the generated
vector loads with ``layout.load(model, theta)``. phi is every parameter of this module, embeddings included.

Initialisation is torch's default for ``nn.Linear`` and ``nn.Embedding`` (uniform(+-1/sqrt(fan_in)), N(0, 1)),
drawn from ``generator``; the construction leaves the global random state as it found it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class HyperNetwork(nn.Module):
    """``forward(clients)`` -> ``[len(clients), sum(numels)]``: the generated parameters of each client."""

    def __init__(
        self,
        num_clients: int,
        numels: Sequence[int],
        embedding_dim: int,
        hidden_dim: int = 100,
        n_hidden: int = 3,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # torch's own initialisation is overwritten below
            self.embeddings = nn.Embedding(num_clients, embedding_dim)
            layers: list[nn.Module] = [nn.Linear(embedding_dim, hidden_dim)]
            for _ in range(n_hidden):
                layers += [nn.ReLU(), nn.Linear(hidden_dim, hidden_dim)]
            self.mlp = nn.Sequential(*layers)
            self.heads = nn.ModuleList(nn.Linear(hidden_dim, n) for n in numels)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """torch's default initialisation, drawn from ``generator``."""
        self.embeddings.weight.normal_(0.0, 1.0, generator=generator)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                module.weight.uniform_(-bound, bound, generator=generator)
                module.bias.uniform_(-bound, bound, generator=generator)

    def generate(self, embedding: torch.Tensor) -> torch.Tensor:
        """Target parameters for embeddings ``[b, embedding_dim]``: ``[b, numel]``."""
        features = self.mlp(embedding)
        return torch.cat([head(features) for head in self.heads], dim=1)

    def forward(self, clients: torch.Tensor) -> torch.Tensor:
        return self.generate(self.embeddings(clients))
