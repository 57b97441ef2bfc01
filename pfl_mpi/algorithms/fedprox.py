"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

Moves: exactly FedAvg's messages (w down by Broadcast, the weighted update w_k - w_t up by
WeightedSum). Computes: each sampled client minimises F_k(w) + (mu/2) ||w - w_t||^2 by local SGD
from w_t, the proximal term pulling its model back towards the w_t it received.

Systems heterogeneity (section 5.2 of the paper): each sampled client is a straggler with
probability ``straggler_fraction``, decided by a seed of (seed, client, round), so the same clients
straggle whatever the number of ranks and whether stragglers are kept or dropped. A straggler runs
a number of local epochs drawn uniformly from {1, ..., E-1} (the authors' code:
``randint(low=1, high=E)``; with E = 1 a straggler still runs its single epoch). Then either
- ``drop_stragglers: false`` (FedProx): its partial work is aggregated like any other update; or
- ``drop_stragglers: true`` (FedAvg's treatment in the paper): it does no work and sends a zero
  update with weight 0, so it contributes nothing and the weights are normalised over the others.
If every sampled client of a round is dropped, the server keeps w_t (no optimiser step).

Client metrics: ``local_epochs`` (epochs actually run, 0 for a dropped client) and ``straggler``
(1 or 0). A dropped client's ``train_loss`` is the loss of w_t on its training split.

Batched clients (``train.client_batch``): a block of clients trains together, each with its own epochs and
its proximal term (``batched.ProximalTerm``); dropped stragglers do not train.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from ..seeding import derive_seed
from ..training.loop import Means
from ..training.proximal import ProximalTerm
from .base import Client, Setup, Update, WeightedMean, WeightedSum
from .fedavg import FedAvgParams
from .registry import register
from .shared_model import SharedModelAlgorithm
from .weighting import client_weight

_STRAGGLER = 0x5354_5241  # stream tag of the straggler draws ("STRA"), apart from the runtime's tags


class FedProxParams(FedAvgParams):
    mu: float = Field(
        1.0,
        ge=0,
        description="proximal coefficient mu of (mu/2)||w - w_t||^2; 0 = FedAvg's local objective. The paper "
        "tunes it in {0.001, 0.01, 0.1, 0.5, 1}; 1 is its choice on the synthetic data, MNIST and FEMNIST",
    )
    straggler_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="probability that a sampled client is a straggler this round (the paper's 0, 0.5, 0.9); "
        "a straggler runs uniformly 1..E-1 local epochs",
    )
    drop_stragglers: bool = Field(
        False, description="drop stragglers from the aggregate (FedAvg in the paper) instead of keeping their work"
    )


@register
class FedProx(SharedModelAlgorithm):
    name = "fedprox"
    tuning_grid = {"algorithm.mu": [0.01, 0.1], "train.lr": [0.1, 0.3]}  # docs/tuning.md
    Params = FedProxParams
    up = WeightedSum()  # w down and w_k - w up, as in FedAvg
    client_metrics = ("train_loss", "local_epochs", "straggler")

    def __init__(self, params: FedProxParams, setup: Setup):
        super().__init__(params, setup)
        self.shared_params = [setup.model.get_parameter(n) for n in self.shared.names]

    def up_numel(self) -> int:
        return self.shared.numel

    def straggler_epochs(self, client: Client) -> int | None:
        """Local epochs of a straggler this round, or None if the client is not one (placement-independent)."""
        fraction = self.params.straggler_fraction
        if fraction == 0:
            return None
        rng = np.random.default_rng(derive_seed(self.setup.seed, _STRAGGLER, client.id, client.round))
        if rng.random() >= fraction:
            return None
        epochs = self.setup.train.local_epochs
        return int(rng.integers(1, epochs)) if epochs > 1 else 1

    def aggregate(self, round: int, up: WeightedMean) -> dict[str, float]:
        if up.total_weight == 0:  # every sampled client was a dropped straggler: nothing to apply
            return {"update_norm": 0.0}
        return self.shared.step(up.mean)

    # -- client ---------------------------------------------------------------------------
    # the client step is begin_training, the library's loop, finish_training: blocks of train.client_batch
    # clients train together (training/batched.py), the proximal term stacked
    def _epochs(self, client: Client) -> int:
        straggler = self.straggler_epochs(client)
        return self.setup.train.local_epochs if straggler is None else straggler

    def begin_training(self, client: Client, payload: torch.Tensor) -> dict | Update:
        self.shared.load(client, payload)
        if self.params.drop_stragglers and self.straggler_epochs(client) is not None:
            loss, _ = self.setup.task.evaluate(self.setup.model, *client.train)
            metrics = {"train_loss": loss, "local_epochs": 0.0, "straggler": 1.0}
            return Update(torch.zeros_like(payload), 0.0, metrics)
        mu = self.params.mu
        prox = (
            ProximalTerm(self.shared_params, self.shared.names, payload, mu) if mu > 0 and self.shared_params else None
        )
        return {"regulariser": prox, "epochs": self._epochs(client)}

    def finish_training(self, client: Client, payload: torch.Tensor, means: Means) -> Update:
        delta = self.shared.collect(client, payload)
        straggler = float(self.straggler_epochs(client) is not None)
        metrics = {
            "train_loss": means["train_loss"],
            "local_epochs": float(self._epochs(client)),
            "straggler": straggler,
        }
        return Update(delta, client_weight(self.params.weighting, client, self.setup), metrics)
