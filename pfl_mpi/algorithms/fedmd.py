"""FedMD (Li and Wang, "FedMD: Heterogenous Federated Learning via Model Distillation", NeurIPS 2019 workshop
on federated learning).

Clients share their predictions on a public data set D0 instead of weights, so their architectures may differ
freely (``model.architectures``): the messages are logits, whose size depends only on the public subset and
the number of classes.

Public data: ``data.public`` (``pfl_mpi/data/public.py``), either a part of the clients' data set held apart
before partitioning (``source: holdout``; no client holds a public sample) or another data set with the
same input shape and classes. Every rank computes it from the configuration and the seed.

Moves, in round t (rounds count from 0), with n = ``alignment_size`` (the paper's N_alignment) and C classes:
- down: Broadcast (float32) of the consensus [n x C] of round t-1: the weighted mean of the logits that the
  clients of round t-1 gave on that round's public subset S_{t-1}. In round 0 there is none (zeros, unused).
- up: WeightedSum (float32) of each sampled client's logits [n x C] on S_t, with weight 1 (``weighting:
  uniform``, the paper) or its training samples (``samples``): one Reduce, n * C * 4 + 4 bytes per worker
  whatever the models. The server's consensus is the weighted mean.
S_t, n distinct public samples, is drawn from (seed, t): every rank knows S_{t-1} and S_t without messages.

Computes, on a client of round t (its whole model is its state, of its group's size):
1. transfer-learning start, once: the model starts from its architecture's initialisation trained on D0 with
   labels for ``public_epochs`` epochs (batches of ``public_batch_size``), then, the first time the client
   is sampled, trains on its private data for ``private_epochs`` epochs. The public part depends on the
   architecture group and the seed only, so it is the client state's initial value, computed once per group
   on each rank; every client of a group starts from the same public-trained model, as a group's clients all
   start from the same initialisation.
2. digest (t > 0): ``logits_matching_epochs`` epochs of regression of its logits on S_{t-1} towards the
   consensus (``digest_loss``: l1, mean absolute error, as the authors' code compiles its logits model;
   or mse), batches of ``logits_matching_batch_size``;
3. revisit (t > 0): local training on its private data, ``train.local_epochs`` epochs of ``train.batch_size``
   (the paper's N_private_training_round and private_training_batchsize);
4. scores S_t with the model it now has and sends the logits (before softmax).
This is the paper's round (score, average, digest, revisit) with the scoring of each round done at the end of
the previous one, so that a consensus moves once per round: the logits a client digests in round t are
those of the models after round t-1's revisit, as in the paper.

Choices made here: every step is the SGD of ``training.sgd_epochs`` (the authors' code uses Adam with lr
1e-3): the digest uses ``digest_lr`` (default ``train.lr``); the public and private epochs use ``train.lr``,
the private ones ``train.batch_size`` (the authors' full-stack training: 25 epochs of batch 32 with early
stopping; their pre-training on D0: 20 epochs of batch 128, with early stopping, which is not done here).
S_t is a uniform draw of the public set (the authors' code draws it stratified by label). Evaluation: the
client's own model on its test split. ``train_loss`` is the revisit's loss, or the private part of the start
in a client's first round without a consensus; ``digest_loss`` is 0 in a round without a digest.

The public set reaches the algorithm as ``Setup.public`` (``data.public``, loaded with the clients' data).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..data.public import PublicData
from ..errors import ConfigError
from ..runtime.seeding import derive_seed
from .base import Algorithm, Broadcast, Client, Setup, Update, WeightedMean, WeightedSum
from .personal_models import PersonalModels
from .registry import register
from .training import sgd_epochs

_ALIGNMENT = 0x464D_41  # stream tag of a round's public subset
_PUBLIC_START = 0x464D_50  # stream tag of an architecture group's training on the public data


class FedMDParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alignment_size: int = Field(
        5000, ge=1, description="N_alignment: public samples scored per round (at most data.public.size)"
    )
    logits_matching_epochs: int = Field(
        1, ge=0, description="N_logits_matching_round: digest epochs on the round's public subset"
    )
    logits_matching_batch_size: int = Field(256, ge=1, description="logits_matching_batchsize: digest batch size")
    digest_lr: float | None = Field(None, gt=0, description="digest learning rate; None: train.lr")
    digest_loss: Literal["l1", "mse"] = Field(
        "l1", description="distance of the logits to the consensus: l1 (mean absolute error, the authors' code) or mse"
    )
    public_epochs: int = Field(
        20, ge=0, description="transfer-learning start: epochs on the labelled public data (the authors' 20)"
    )
    public_batch_size: int = Field(128, ge=1, description="transfer-learning start: batch size on the public data")
    private_epochs: int = Field(
        25, ge=0, description="transfer-learning start: epochs on the private data in a client's first round (25)"
    )
    weighting: Literal["uniform", "samples"] = Field(
        "uniform", description="weight of a client's logits in the consensus: uniform (the paper) or training samples"
    )


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


@register
class FedMD(Algorithm):
    name = "fedmd"
    Params = FedMDParams
    heterogeneous = True
    eval_payload = False  # clients evaluate their own models
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

    def client_state_spec(self, group: int = 0) -> dict[str, int]:
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
            cfg = self.setup.train.model_copy(update={"batch_size": self.params.public_batch_size})
            with torch.enable_grad():  # also when the caller is not training
                sgd_epochs(model, self.public_x, self.public_y, cfg, generator, epochs=self.params.public_epochs)
            self._public_start[group] = layout.flatten(model)
        return self._public_start[group]

    # -- server ---------------------------------------------------------------------------
    def init_server(self) -> None:
        self.consensus = torch.zeros(self.params.alignment_size * self.classes)

    def downlink(self, round: int, clients: list[int]) -> torch.Tensor:
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
            train_loss = self.local_sgd(client, epochs=self.params.private_epochs)
            client.state["started"].fill_(1.0)
        if client.round > 0:
            previous = self.public_x[self.subset(client.round - 1)]
            consensus = payload.reshape(-1, self.classes).to(previous.device)
            digest_loss = self.digest(client, model, previous, consensus)
            train_loss = self.local_sgd(client)
        logits = score(model, self.public_x[self.subset(client.round)])
        self.personal.save(client, model)
        weight = 1.0 if self.params.weighting == "uniform" else float(client.num_train)
        return Update(logits.reshape(-1).cpu(), weight, {"train_loss": train_loss, "digest_loss": digest_loss})

    def digest(self, client: Client, model: torch.nn.Module, x: torch.Tensor, consensus: torch.Tensor) -> float:
        """``logits_matching_epochs`` epochs of SGD moving the model's logits on ``x`` towards ``consensus``
        (the step of ``training.sgd_epochs``: weight decay, then momentum); the mean batch loss."""
        cfg, p = self.setup.train, self.params
        params = self.setup.params_for(client.id)
        lr = cfg.lr if p.digest_lr is None else p.digest_lr
        distance = F.l1_loss if p.digest_loss == "l1" else F.mse_loss
        model.train()
        momentum = [torch.zeros_like(q) for q in params] if cfg.momentum else None
        total, batches = torch.zeros((), device=x.device), 0
        for _ in range(p.logits_matching_epochs):
            order = torch.randperm(x.shape[0], generator=client.generator).to(x.device)
            for start in range(0, x.shape[0], p.logits_matching_batch_size):
                idx = order[start : start + p.logits_matching_batch_size]
                loss = distance(model(x[idx]), consensus[idx])
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for i, (q, g) in enumerate(zip(params, grads, strict=True)):
                        if cfg.weight_decay:
                            g = g.add(q, alpha=cfg.weight_decay)
                        if momentum is not None:
                            g = momentum[i].mul_(cfg.momentum).add_(g)
                        q.add_(g, alpha=-lr)
                    total += loss.detach()
                batches += 1
        return float(total) / max(batches, 1)

    def load_for_eval(self, client: Client, payload: None) -> None:
        self.personal.load(client)
