"""FedGen's generator G(z, y): noise and a label to a point of a model's feature space, and the two losses that
fit it to the clients' heads (Zhu, Hong and Zhou, ICML 2021; the layers are those of the authors' code)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .params import ParamLayout


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


class FlatHead:
    """Where a model's head (the parameters named ``head.*``, after the base's) lies in its flat shared vector,
    and the head of a flat vector as the named tensors ``functional_call(model.head, ...)`` takes."""

    def __init__(self, model: nn.Module, shared: ParamLayout):
        names = [n for n in shared.names if n.startswith("head.")]
        if not names or not hasattr(model, "feature_dim"):
            raise ValueError("FedGen needs a model split into base and head (a SplitModel)")
        first = shared.names.index(names[0])
        if list(shared.names[first:]) != names:
            raise ValueError("FedGen expects the head's parameters after the base's")
        self.layout = ParamLayout(model, names)
        self.start = sum(shared.numels[:first])

    def params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The head of ``flat`` (a whole shared vector), named as ``model.head``'s own parameters (views)."""
        head = flat[self.start : self.start + self.layout.numel]
        return {n.removeprefix("head."): v for n, v in self.layout.views(head).items()}


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


def fit_generator(
    generator: FeatureGenerator,
    optimizer: torch.optim.Optimizer,
    head: nn.Module,
    heads: list[dict[str, torch.Tensor]],
    alpha: torch.Tensor,
    distribution: torch.Tensor,
    rng: torch.Generator,
    steps: int,
    batch_size: int,
    teacher_weight: float,
    diversity_weight: float,
) -> dict[str, float]:
    """``steps`` optimiser steps on G, each on ``batch_size`` labels y ~ ``distribution`` with noise z ~ U[0, 1):
    teacher_weight * sum_k mean_b alpha[k, y_b] CE(h_k(G(z_b, y_b)), y_b) + diversity_weight * diversity.
    ``heads[k]`` are client k's head parameters, applied through ``head``'s forward; returns the mean teacher and
    diversity losses and the accuracy of the alpha-weighted ensemble of heads on G's samples."""
    generator.train()
    sums = torch.zeros(3, dtype=torch.float64)
    for _ in range(steps):
        y = torch.multinomial(distribution, batch_size, replacement=True, generator=rng)
        z = torch.rand(batch_size, generator.noise_dim, generator=rng)
        features = generator(z, y)
        teacher, ensemble_logits = torch.zeros(()), torch.zeros(())
        for k, params in enumerate(heads):
            logits = functional_call(head, params, (features,))
            weight = alpha[k, y]
            teacher = teacher + (weight * F.cross_entropy(logits, y, reduction="none")).mean()
            ensemble_logits = ensemble_logits + weight[:, None] * logits.detach()
        diversity = diversity_loss(z, features)
        loss = teacher_weight * teacher + diversity_weight * diversity
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        accuracy = (ensemble_logits.argmax(dim=1) == y).double().mean()
        sums += torch.stack([teacher.detach().double(), diversity.detach().double(), accuracy])
    generator.eval()
    teacher, diversity, accuracy = (sums / steps).tolist()
    return {"generator_teacher_loss": teacher, "generator_diversity_loss": diversity, "ensemble_acc": accuracy}


class GeneratorFit:
    """The server's side of G: G, the Adam that fits it (learning rate ``lr * lr_decay**round``), the head that
    scores its samples, and their checkpoint (G's flat state, Adam's per-parameter state)."""

    def __init__(self, generator: FeatureGenerator, head: nn.Module, lr: float, lr_decay: float, weight_decay: float):
        self.generator, self.lr, self.lr_decay = generator, lr, lr_decay
        self.optimizer = torch.optim.Adam(
            generator.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay
        )
        self.head = copy.deepcopy(head).cpu().eval()

    def fit(self, round: int, heads: list[dict[str, torch.Tensor]], *args) -> dict[str, float]:
        """``fit_generator(G, Adam, head, heads, *args)`` at round ``round``'s learning rate."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * self.lr_decay**round
        return fit_generator(self.generator, self.optimizer, self.head, heads, *args)

    def state(self) -> dict[str, torch.Tensor | dict]:
        adam = self.optimizer.state_dict()["state"]  # empty before the generator's first step
        return {"generator": self.generator.flat(), "generator_adam": adam}

    def load_state(self, state: dict) -> None:
        self.generator.load_flat(state["generator"].reshape(-1))
        groups = self.optimizer.state_dict()["param_groups"]  # configuration, not state
        self.optimizer.load_state_dict({"state": state.get("generator_adam", {}), "param_groups": groups})
