"""FedMD (Li and Wang, "FedMD: Heterogenous Federated Learning via Model Distillation", NeurIPS 2019 workshop on
federated learning): clients share logits on a public data set instead of weights, so architectures may differ.

Moves (float32), in round t: down, Broadcast: the consensus [n x C], the weighted mean of the logits the clients
of round t-1 gave on that round's public subset S_{t-1} (n = ``alignment_size`` samples drawn from (seed, t), so
every rank knows them); up, WeightedSum: each client's logits on S_t. Computes: a client starts once from its
architecture trained on the labelled public data (its state's initial value) and ``private_epochs`` on its own
data; then each round it digests (regresses its logits on S_{t-1} towards the consensus), revisits (trains on its
data) and scores S_t. The server only averages. Departs from the authors' code in using the library's SGD, no
early stopping and a uniform (not stratified) S_t: see docs/algorithms.md#fedmd, with the full design.
Over 150 lines: three client phases (pre-training, digest, revisit). Not batched: clients train one by one.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..data.public import PublicData
from ..errors import ConfigError
from ..seeding import derive_seed
from ..training.loop import Batch, LossFn, local_training, make_optimizer
from .base import Algorithm, Broadcast, Client, Phase, Setup, Update, WeightedMean, WeightedSum
from .personal_models import PersonalModels
from .registry import register

_ALIGNMENT = 0x464D_41  # stream tag of a round's public subset
_PUBLIC_START = 0x464D_50  # stream tag of an architecture group's training on the public data


class FedMDParams(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")
    alignment_size: int = Field(5000, ge=1, description="N_alignment: public samples scored per round (<= public size)")
    logits_matching_epochs: int = Field(1, ge=0, description="N_logits_matching_round: digest epochs on the subset")
    logits_matching_batch_size: int = Field(256, ge=1, description="logits_matching_batchsize: digest batch size")
    digest_lr: float | None = Field(None, gt=0, description="digest learning rate; None: train.lr")
    digest_loss: Literal["l1", "mse"] = Field(
        "l1", description="distance of the logits to the consensus: l1 (mean absolute error, the authors' code) or mse"
    )
    public_epochs: int = Field(20, ge=0, description="transfer-learning start: epochs on the labelled public data (20)")
    public_batch_size: int = Field(128, ge=1, description="transfer-learning start: batch size on the public data")
    private_epochs: int = Field(25, ge=0, description="transfer-learning start: private epochs in the first round (25)")
    weighting: Literal["uniform", "samples"] = Field(
        "uniform", description="weight of a client's logits in the consensus: uniform (the paper) or training samples"
    )


@register
class FedMD(Algorithm):
    name = "fedmd"
    own_loss = True  # its own cross-entropy: classification only, no train.loss
    Params = FedMDParams
    heterogeneous = True
    down = Broadcast()
    up = WeightedSum()
    client_metrics = ("train_loss", "digest_loss")

    def __init__(self, params: FedMDParams, setup: Setup):
        super().__init__(params, setup)
        public = self.public_data(params, setup.public)
        self.public_x, self.public_y = public.x.to(setup.device), public.y.to(setup.device)
        self.classes = setup.num_classes
        self.personal = PersonalModels(setup)
        self._public_start: dict[int, torch.Tensor] = {}  # group -> its model trained on the public data
        self._subsets: dict[int, torch.Tensor] = {}  # round -> its public subset

    @staticmethod
    def public_data(params: FedMDParams, public: PublicData | None) -> PublicData:
        """``public``, checked: ``ConfigError`` when there is none or it is too small."""
        if public is None:
            raise ConfigError(
                "data.public", "fedmd needs a public data set: set data.public.size (and data.public.source)"
            )
        if params.alignment_size > len(public):
            raise ConfigError(
                "algorithm.alignment_size",
                f"{params.alignment_size} exceeds the {len(public)} public samples (data.public.size)",
            )
        return public

    def subset(self, round: int) -> torch.Tensor:
        """Rows of the public set scored in ``round`` (drawn once per round on this rank)."""
        if round not in self._subsets:
            self._subsets = {r: s for r, s in self._subsets.items() if r == round - 1}  # the digest's, kept
            self._subsets[round] = alignment_indices(
                self.setup.seed, round, len(self.public_y), self.params.alignment_size
            )
        return self._subsets[round]

    # -- sizes and state ------------------------------------------------------------------
    def down_numel(self) -> int:
        return self.params.alignment_size * self.classes

    def up_numel(self) -> int:
        return self.params.alignment_size * self.classes

    def client_state_spec(self, group: int) -> dict[str, int]:
        return {"model": self.personal.numel(group), "started": 1}

    def init_client_state(self, client_id: int) -> dict[str, torch.Tensor]:
        return {"model": self.public_start(self.setup.group_of(client_id)).clone(), "started": torch.zeros(1)}

    def public_start(self, group: int) -> torch.Tensor:
        """Architecture ``group``'s initial model after ``public_epochs`` epochs on the labelled public data
        (flat); a function of (seed, group), computed once per rank."""
        if group not in self._public_start:
            model, layout = self.setup.models[group], self.personal.layouts[group]
            layout.load(model, self.personal.initial[group])
            generator = torch.Generator().manual_seed(derive_seed(self.setup.seed, _PUBLIC_START, group))
            cfg = self.setup.train.model_copy(
                update={"local_epochs": self.params.public_epochs, "batch_size": self.params.public_batch_size}
            )
            with torch.enable_grad():  # also when the caller is not training
                local_training(model, self.public_x, self.public_y, cfg, generator)
            self._public_start[group] = layout.flatten(model)
        return self._public_start[group]

    # -- server ---------------------------------------------------------------------------
    def init_server(self) -> None:
        self.consensus = torch.zeros(self.params.alignment_size * self.classes)

    def downlink(self, round: int, clients: list[int], phase: Phase) -> torch.Tensor:
        return self.consensus

    def aggregate(self, round: int, up: WeightedMean) -> dict[str, float]:
        self.consensus = up.mean.clone()
        predicted = self.consensus.reshape(-1, self.classes).argmax(dim=1)
        labels = self.public_y[self.subset(round)].cpu()
        return {"consensus_acc": float((predicted == labels).float().mean())}

    def server_state(self) -> dict[str, torch.Tensor]:
        return {"consensus": self.consensus}

    def load_server_state(self, state: dict[str, torch.Tensor]) -> None:
        self.consensus = state["consensus"].clone().float()

    def global_state(self) -> dict[str, torch.Tensor]:
        return {"consensus": self.consensus}

    # -- client ---------------------------------------------------------------------------
    def client_update(self, client: Client, payload: torch.Tensor) -> Update:
        model = self.personal.load(client)
        train_loss = digest_loss = 0.0
        if not client.state["started"].item():
            train_loss = self.local_training(client, epochs=self.params.private_epochs)["train_loss"]
            client.state["started"].fill_(1.0)
        if client.round > 0:
            previous = self.public_x[self.subset(client.round - 1)]
            consensus = payload.reshape(-1, self.classes).to(previous.device)
            digest_loss = self.digest(client, model, previous, consensus)
            train_loss = self.local_training(client)["train_loss"]
        logits = score(model, self.public_x[self.subset(client.round)])
        self.personal.save(client, model)
        weight = 1.0 if self.params.weighting == "uniform" else float(client.num_train)
        return Update(logits.reshape(-1).cpu(), weight, {"train_loss": train_loss, "digest_loss": digest_loss})

    def digest(self, client: Client, model: torch.nn.Module, x: torch.Tensor, consensus: torch.Tensor) -> float:
        """``logits_matching_epochs`` epochs of the library loop moving the model's logits on ``x`` towards
        ``consensus`` (batches of ``logits_matching_batch_size``; the ``train`` optimiser of this round, at
        ``digest_lr`` if set); the mean batch loss."""
        p, setup = self.params, self.setup
        cfg = setup.train.model_copy(
            update={"local_epochs": p.logits_matching_epochs, "batch_size": p.logits_matching_batch_size}
        )
        optimizer = make_optimizer(setup.params_for(client.id), setup.train, client.round, setup.rounds, p.digest_lr)
        loss = logit_distance(p.digest_loss)
        means = local_training(model, x, consensus, cfg, client.generator, loss=loss, optimizer=optimizer)
        return means["digest_loss"]

    def load_for_eval(self, client: Client, payload: None) -> None:
        self.personal.load(client)


def alignment_indices(seed: int, round: int, public_size: int, alignment_size: int) -> torch.Tensor:
    """The public samples scored in ``round``: ``alignment_size`` distinct rows of the public set, from (seed,
    round) alone, so every rank draws the same ones."""
    generator = torch.Generator().manual_seed(derive_seed(seed, _ALIGNMENT, round))
    return torch.randperm(public_size, generator=generator)[:alignment_size]


@torch.no_grad()
def score(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The model's logits (before softmax) on ``x``, float32 [len(x), C]."""
    model.eval()
    return torch.cat([model(x[start : start + batch_size]) for start in range(0, x.shape[0], batch_size)]).float()


def logit_distance(kind: str) -> LossFn:
    """The digest's loss: the distance (l1: mean absolute error, or mse) of the model's logits to the consensus
    rows ``batch.y``, reported as ``digest_loss``."""
    distance = F.l1_loss if kind == "l1" else F.mse_loss

    def loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        value = distance(model(batch.x), batch.y)
        return value, {"digest_loss": value}

    return loss
