"""FedGen's generator G(z, y): noise and a label to a point of a model's feature space, and the two losses that
fit it to the clients' heads (Zhu, Hong and Zhou, ICML 2021; the layers are those of the authors' code)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FeatureGenerator(nn.Module):
    """G(z, y) = Linear(ReLU(BatchNorm(Linear([z, onehot(y)])))): a point of the model's feature space.

    ``state_tensors`` (parameters, then the BatchNorm running mean and variance) is what travels and what is
    checkpointed. Initialisation is torch's default, drawn from ``generator``; the global random state is untouched.
    """

    def __init__(self, num_classes: int, feature_dim: int, noise_dim: int, hidden_dim: int, generator: torch.Generator):
        super().__init__()
        self.num_classes, self.noise_dim = num_classes, noise_dim
        with torch.random.fork_rng(devices=[]):  # torch's own initialisation is overwritten below
            self.fc = nn.Linear(noise_dim + num_classes, hidden_dim)
            self.bn = nn.BatchNorm1d(hidden_dim)
            self.out = nn.Linear(hidden_dim, feature_dim)
        with torch.no_grad():
            for layer in (self.fc, self.out):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(y, self.num_classes).to(z.dtype)
        return self.out(F.relu(self.bn(self.fc(torch.cat([z, onehot], dim=1)))))

    def state_tensors(self) -> list[torch.Tensor]:
        return [*self.parameters(), self.bn.running_mean, self.bn.running_var]

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.state_tensors())

    def flat(self) -> torch.Tensor:
        """The state tensors as one float32 CPU vector (a copy)."""
        return torch.cat([t.detach().reshape(-1) for t in self.state_tensors()]).to("cpu", torch.float32)

    @torch.no_grad()
    def load_flat(self, flat: torch.Tensor) -> None:
        tensors = self.state_tensors()
        flat = flat.to(tensors[0].device)
        for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            t.copy_(chunk.view_as(t))


def label_weights(counts: torch.Tensor) -> torch.Tensor:
    """alpha [K, C]: alpha[k, y] = counts[k, y] / sum_j counts[j, y]; a column no client holds is all zeros."""
    counts = counts.double()
    totals = counts.sum(dim=0, keepdim=True)
    return torch.where(totals > 0, counts / totals.clamp_min(1.0), torch.zeros_like(counts))


def diversity_loss(noise: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """exp(-mean over pairs of (mean squared noise distance) * (mean absolute feature distance))."""
    noise_dist = (noise[:, None] - noise[None]).pow(2).mean(dim=2)
    feature_dist = (features[:, None] - features[None]).abs().mean(dim=2)
    return torch.exp(-(noise_dist * feature_dist).mean())
