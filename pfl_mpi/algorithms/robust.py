"""Robust aggregation of gathered client updates: coordinate-wise median and trimmed mean.

- median (Yin et al., ICML 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
  Rates", median-based GD): the server step is the coordinate-wise median of the K client updates
  (for even K the mean of the two middle values).
- trimmed_mean (same paper): per coordinate, drop the beta K largest and beta K smallest values
  (beta K rounded down) and average the rest; beta < 1/2.
- mean: the weighted mean (FedAvg's aggregate through a Gatherv), for comparison under attack.

Both robust rules are unweighted, as in the paper. "Bridging the Gap between Median and Mean"
(Chen et al., NeurIPS 2020): with ``sigma`` > 0 every client adds Gaussian noise N(0, sigma^2 I) to
its update before sending it (noisy median / noisy trimmed mean), which reduces the median's bias
under non-IID data. Byzantine clients (``byzantine``, see byzantine.py) replace their update.

Moves: w down by Broadcast (4 d bytes per worker), every update up by Gatherv (float32: 4 d bytes
per sampled client): these rules are non-linear, so no Reduce. Computes: FedAvg's local training;
on the server, the rule (a sort of the K x d updates), then FedAvg's server optimiser on it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from ..training.loop import Means
from .base import Client, Collected, Gathered, Setup, Update
from .byzantine import Byzantine, ByzantineConfig, gaussian_noise
from .fedavg import FedAvgParams
from .registry import register
from .shared_model import TrainsFromW


class RobustParams(FedAvgParams):
    rule: Literal["median", "trimmed_mean", "mean"] = Field(
        "median", description="coordinate-wise median, trimmed mean (Yin et al. 2018) or the weighted mean"
    )
    beta: float = Field(0.1, ge=0, lt=0.5, description="trimmed_mean: fraction beta trimmed at each end per coordinate")
    sigma: float = Field(
        0.0, ge=0, description="std of the Gaussian noise each client adds to its update (Chen et al. 2020); 0: none"
    )
    byzantine: ByzantineConfig = Field(default_factory=ByzantineConfig, description="Byzantine clients (testing)")


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Median of each column of ``x`` [K, d]; the mean of the two middle values when K is even."""
    s = x.sort(dim=0).values
    k = x.shape[0]
    return s[k // 2] if k % 2 else 0.5 * (s[k // 2 - 1] + s[k // 2])


def trimmed_mean(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean of each column of ``x`` [K, d] without its floor(beta K) largest and smallest values."""
    k = x.shape[0]
    b = math.floor(beta * k)
    return x.sort(dim=0).values[b : k - b].mean(dim=0)


@register
class Robust(TrainsFromW):
    name = "robust"
    Params = RobustParams
    up = Gathered()

    def __init__(self, params: RobustParams, setup: Setup):
        super().__init__(params, setup)
        self.byzantine = Byzantine(params.byzantine, setup.seed, setup.num_clients)

    def up_numel(self) -> int:
        return self.shared.numel

    # -- server ---------------------------------------------------------------------------

    def aggregate(self, round: int, up: Collected) -> dict[str, float]:
        return self.shared.step(self.combine(up))

    def combine(self, up: Collected) -> torch.Tensor:
        p = self.params
        if p.rule == "median":
            return coordinate_median(up.payloads)
        if p.rule == "trimmed_mean":
            return trimmed_mean(up.payloads, p.beta)
        return up.weighted_mean()

    # -- client ---------------------------------------------------------------------------
    # the client step is FedAvg's, split for batched clients (training/batched.py)
    def finish_training(self, client: Client, payload: torch.Tensor, means: Means) -> Update:
        delta, weight = self.trained(client, payload)
        return Update(self.sent_update(client, delta), weight, {"train_loss": means["train_loss"]})

    def sent_update(self, client: Client, delta: torch.Tensor) -> torch.Tensor:
        """The update ``client`` sends: its own plus noise (sigma > 0), or a Byzantine client's."""
        if self.params.sigma > 0:
            delta = delta + gaussian_noise(delta, self.params.sigma, self.setup.seed, client)
        return self.byzantine.apply(delta, client)
