"""Ditto (Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning Through Personalization", ICML 2021).

Moves: exactly FedAvg's messages, nothing else: the global w goes down by Broadcast and the
update w_k - w_t comes up by WeightedSum. The personal model v_k is client state and never moves
(it reaches rank 0 only as checkpoint bookkeeping, the runtime's ``state`` label).

Computes (Algorithm 1 of the paper): a sampled client first trains w exactly as FedAvg does (same
epochs, same random stream, so the global model of Ditto is the global model of FedAvg), then
updates its own v_k by local SGD on F_k(v) + (lam/2) ||v - w_t||^2, pulled towards the w_t it
received. Evaluation (and the runtime's fine-tuning) uses v_k.

The personal steps draw their minibatches from a copy of the client's generator taken before the
global steps, so v and w see the same batches in the same order, as in the authors' code (one step
of v and one of w on each batch). With lam = 0, v_k is therefore exactly what ``local`` trains.

Batched clients (``train.client_batch``): a block of clients trains its w's together, then its v's.
"""

from __future__ import annotations

from collections.abc import Generator

import torch
from pydantic import Field

from ..training.loop import Means
from ..training.proximal import ProximalTerm
from .base import Client, Setup, Update, WeightedMean, WeightedSum
from .fedavg import FedAvgParams
from .registry import register
from .shared_model import SharedModelAlgorithm
from .weighting import client_weight


class DittoParams(FedAvgParams):
    lam: float = Field(
        1.0,
        ge=0,
        description="lambda of (lambda/2)||v - w_t||^2: 0 = local training, large = the global model "
        "(the paper tunes it in {0.05, 0.1, 0.2, 0.5, 1, 2}; the authors' scripts use 1)",
    )
    personal_epochs: int | None = Field(
        None,
        ge=1,
        description="epochs of the personal update of v_k per round (s of Algorithm 1, counted in epochs); "
        "null = train.local_epochs, as many steps as w gets (the authors' code)",
    )


@register
class Ditto(SharedModelAlgorithm):
    name = "ditto"
    tuning_grid = {"algorithm.lam": [0.01, 0.1], "train.lr": [0.1, 0.3]}  # docs/tuning.md
    Params = DittoParams
    up = WeightedSum()  # w down and w_k - w up, as in FedAvg
    client_metrics = ("train_loss", "personal_train_loss")
    evaluates_global = True  # w beside the personal v_k

    def __init__(self, params: DittoParams, setup: Setup):
        super().__init__(params, setup)  # self.shared: the global w
        self.shared_params = [setup.model.get_parameter(n) for n in self.shared.names]
        self.initial_v = self.shared.flatten()  # v_k^0 = w^0, as in the authors' code

    def up_numel(self) -> int:
        return self.shared.numel

    def client_state_spec(self, group: int) -> dict[str, int]:
        return {"v": self.shared.numel}

    def init_client_state(self, client_id: int) -> dict[str, torch.Tensor]:
        return {"v": self.initial_v.clone()}

    def aggregate(self, round: int, up: WeightedMean) -> dict[str, float]:
        return self.shared.step(up.mean)

    # -- client ---------------------------------------------------------------------------
    def client_steps(self, client: Client, payload: torch.Tensor) -> Generator[dict, Means, Update]:
        """w's local training (FedAvg's), then v's from a copy of the generator taken before: two trainings that
        batched clients run block by block."""
        personal_generator = torch.Generator()
        personal_generator.set_state(client.generator.get_state())
        self.shared.load(client, payload)
        means = yield {}  # the global update: FedAvg's
        delta = self.shared.collect(client, payload)
        weight = client_weight(self.params.weighting, client, self.setup)

        lam = self.params.lam
        self.shared.load(client, client.state["v"])
        regulariser = ProximalTerm(self.shared_params, self.shared.names, payload, lam) if lam > 0 else None
        epochs = self.params.personal_epochs or self.setup.train.local_epochs
        personal = yield {"regulariser": regulariser, "epochs": epochs, "generator": personal_generator}
        client.state["v"].copy_(self.shared.flatten())
        return Update(delta, weight, {"train_loss": means["train_loss"], "personal_train_loss": personal["train_loss"]})

    def load_for_eval(self, client: Client, payload: torch.Tensor) -> None:
        self.shared.load(client, client.state["v"])

    def load_global_for_eval(self, client: Client, payload: torch.Tensor) -> None:
        self.shared.load(client, payload)  # the global w, as FedAvg would evaluate it
