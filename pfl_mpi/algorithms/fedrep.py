"""FedRep (Collins et al., "Exploiting Shared Representations for Personalized FL", ICML 2021).

All clients learn one representation phi (the ``base`` layers, the paper's body); each client keeps
its own head h_k (the last ``model.head_layers`` layers) as its state. Each round, a sampled client
loads the global phi^t and its own head, then (the paper's Algorithm 1):

1. ``tau_h`` epochs of SGD on the head alone, phi^t frozen: h_k <- the head fitted to phi^t;
2. ``tau_b`` epochs of SGD on the body alone, its new head frozen: phi_k.

It keeps h_k and sends phi_k - phi^t; the server averages (by ``weighting``: uniform by default, the
paper's phi^{t+1} = 1/(rn) sum_k phi_k) and steps its optimiser (plain FedRep: SGD, lr 1).

Moves: only the body: Broadcast of phi down (``down_numel`` = base parameters), WeightedSum of the body
updates up (``up_numel`` = base parameters). Bytes per round: 4 * base numel down per worker rank,
4 * (base numel + 1) up per worker rank. The head never leaves its client. Evaluation: the global
phi under each client's own head. ``train.local_epochs`` is not used: ``tau_h`` and ``tau_b`` replace it.

Both phases are the library loop ``local_training`` (``train`` section: lr, batch size, momentum reset at the
start of each phase), one permutation per epoch from the client's generator, head phase first.
The authors' code also trains the head epochs first and the representation epochs last in one loop
(``local_ep - local_rep_ep`` head epochs, ``local_rep_ep`` body epochs; 10 and 1 in the paper's image
experiments), so ``tau_h`` = 10, ``tau_b`` = 1 are the defaults.

Batched clients (``train.client_batch``): a block of clients trains its heads together, then its bodies.
"""

from __future__ import annotations

from collections.abc import Generator

import torch
from pydantic import Field

from ..models.split import in_head
from ..training.loop import Means
from .base import Client, Setup, Update, WeightedMean, WeightedSum
from .fedavg import FedAvgParams
from .registry import register
from .shared_model import SharedModelAlgorithm
from .weighting import Weighting, client_weight


class FedRepParams(FedAvgParams):
    weighting: Weighting = Field(
        "uniform",
        description="client weights of the body average: uniform (the paper's 1/(rn) sum), samples, "
        "quality or label_kl (see pfl_mpi/algorithms/weighting.py)",
    )
    tau_h: int = Field(
        10, ge=0, description="epochs of head updates per round, body frozen, done first (paper: tau for the head)"
    )
    tau_b: int = Field(
        1, ge=0, description="epochs of body (representation) updates per round, head frozen, done after the head"
    )


@register
class FedRep(SharedModelAlgorithm):
    name = "fedrep"
    Params = FedRepParams
    up = WeightedSum()  # the body's update, as FedAvg's
    replaces_train = {"local_epochs": "algorithm.tau_h (head epochs) and algorithm.tau_b (body epochs)"}

    def personal(self, param_name: str) -> bool:
        """The head is personal; the body (base) is the shared representation."""
        return in_head(self.setup.model, param_name)

    def __init__(self, params: FedRepParams, setup: Setup):
        super().__init__(params, setup)  # self.shared: the body shared, the head personal
        named = dict(setup.model.named_parameters())
        self.body_params = [named[n] for n in self.shared.names]
        self.head_params = [named[n] for n in self.shared.personal_layout.names]

    def up_numel(self) -> int:
        return self.shared.numel

    def aggregate(self, round: int, up: WeightedMean) -> dict[str, float]:
        return self.shared.step(up.mean)

    # -- client ---------------------------------------------------------------------------
    def client_steps(self, client: Client, payload: torch.Tensor) -> Generator[dict, Means, Update]:
        """Load w and the head, ``tau_h`` epochs on the head, then ``tau_b`` on the body (two trainings that
        batched clients run block by block); the train loss is the mean batch loss over both phases."""
        p = self.params
        self.shared.load(client, payload)
        head_loss = body_loss = 0.0
        if p.tau_h:
            head_loss = (yield {"params": self.head_params, "epochs": p.tau_h})["train_loss"]
        if p.tau_b and self.body_params:
            body_loss = (yield {"params": self.body_params, "epochs": p.tau_b})["train_loss"]
        body_epochs = p.tau_b if self.body_params else 0
        # every epoch has the same number of batches: the mean batch loss over both phases
        epochs = p.tau_h + body_epochs
        loss = (p.tau_h * head_loss + body_epochs * body_loss) / epochs if epochs else 0.0
        delta = self.shared.collect(client, payload)
        return Update(delta, client_weight(self.params.weighting, client, self.setup), {"train_loss": loss})
