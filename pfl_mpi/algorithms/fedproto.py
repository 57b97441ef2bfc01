"""FedProto (Tan, Long, Liu, Zhou, Lu, Jiang and Zhang, "FedProto: Federated Prototype Learning across
Heterogeneous Clients", AAAI 2022).

Clients share class prototypes instead of weights, so their architectures may differ (``model.architectures``)
as long as the embedding f(x) = ``base(x)`` has one size d for all.

Moves: down, Broadcast (float32) of the global prototypes P [C, d] and their sample counts [C]; up, a
WeightedSum with weight 1 in float64 of each sampled client's per-class embedding sums S_k [C, d] and counts
n_k [C], in the slot of its architecture group (the reduce holds one slot per group; a client sends only its
own, what the protocol ledger counts). The server's prototype of class j is sum_k S_kj / sum_k n_kj, the local
prototypes C_k^(j) = S_kj / n_kj weighted by their counts |D_k,j| (the paper's weighting); a class that no client
of the round holds keeps its previous prototype. Server metrics: ``group_proto_dist`` (G > 1 groups), the mean
distance between two groups' prototypes of one class in the round, and ``class_proto_dist``, between two classes'
global prototypes. Bytes up per worker: 8 G (C d + C) + 16. Details: docs/algorithms.md#fedproto.

Computes, on a client: its own model (client state: the whole model of its architecture) trained for
``train.local_epochs`` epochs of SGD on CE(head(f(x)), y) + lam * ||f(x) - P_y||^2, the distance term as the
authors' code computes it (torch's MSELoss: averaged over the batch and the d coordinates; a sample whose class
has no global prototype yet counts as distance 0); then the local prototypes from f(x) of every training
sample with the trained model. Inference: the nearest global prototype in squared Euclidean distance among the
classes of the client's own training data, as the authors' code evaluates (classes without a prototype are never
predicted; the client's head when none of its classes has one). ``test_loss`` is the cross-entropy of the
client's own head, for want of a loss of the nearest-prototype rule; ``head_test_acc`` its accuracy.
Not batched (``train.client_batch``): clients train one after another (its loss adds the prototype term).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from ..models.prototypes import (  # noqa: F401 - prototype_distance re-exported with the algorithm
    local_prototype_sums,
    mean_pair_distance,
    nearest_prototype,
    prototype_distance,
)
from ..models.split import require_base_head
from ..training.loop import Batch, evaluate
from .base import Algorithm, Broadcast, Client, Phase, Setup, Update, WeightedMean, WeightedSum
from .personal_models import PersonalModels
from .registry import register


class FedProtoParams(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")
    lam: float = Field(
        1.0,
        ge=0,
        description="lambda, weight of the prototype distance in the client loss (the authors' code: --ld, "
        "default 1); 0 = local training with CE only",
    )


@register
class FedProto(Algorithm):
    name = "fedproto"
    own_loss = True  # its own cross-entropy: classification only, no train.loss
    Params = FedProtoParams
    heterogeneous = True
    down = Broadcast()
    eval_down = Broadcast()  # nearest-prototype inference needs the global prototypes
    up = WeightedSum(torch.float64)
    client_metrics = ("train_loss", "proto_loss")
    eval_metrics = ("head_test_loss", "head_test_acc")  # the client's own head, beside the nearest prototype

    def __init__(self, params: FedProtoParams, setup: Setup):
        super().__init__(params, setup)
        self.check_models(params, setup.models)
        self.classes, self.dim = setup.num_classes, setup.models[0].feature_dim
        self.personal = PersonalModels(setup)
        self.slot = self.classes * self.dim + self.classes  # one group's sums and counts
        self.eval_prototypes: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def check_models(cls, params: BaseModel, models: list[torch.nn.Module]) -> None:
        require_base_head(models, cls.name)
        dims = [int(m.feature_dim) for m in models]
        if len(set(dims)) > 1:
            sizes = ", ".join(f"architecture {g}: {d}" for g, d in enumerate(dims))
            raise ConfigError("model.architectures", f"fedproto needs one embedding size (base output), got {sizes}")

    # -- sizes and state ------------------------------------------------------------------
    def down_numel(self) -> int:
        return self.classes * self.dim + self.classes

    def up_numel(self) -> int:
        return self.setup.num_groups * self.slot  # the reduce: a slot per architecture group

    def up_numel_of(self, client: int) -> int:
        return self.slot  # what a client sends: its group's slot

    def client_state_spec(self, group: int) -> dict[str, int]:
        return {"model": self.personal.numel(group)}

    def init_client_state(self, client_id: int) -> dict[str, torch.Tensor]:
        return {"model": self.personal.initial_state(client_id)}

    # -- server ---------------------------------------------------------------------------
    def init_server(self) -> None:
        self.prototypes = torch.zeros(self.classes, self.dim)
        self.counts = torch.zeros(self.classes, dtype=torch.float64)  # samples behind each prototype

    def downlink(self, round: int, clients: list[int], phase: Phase) -> torch.Tensor:
        return torch.cat([self.prototypes.reshape(-1), self.counts.float()])

    def aggregate(self, round: int, up: WeightedMean) -> dict[str, float]:
        slots = up.sum.double().reshape(-1, self.slot)  # [G, C d + C]
        cd = self.classes * self.dim
        summed = slots[0] if len(slots) == 1 else slots.sum(dim=0)
        sums, counts = summed[:cd].reshape(self.classes, self.dim), summed[cd:]
        seen = counts > 0
        self.prototypes[seen] = (sums[seen] / counts[seen, None]).float()
        self.counts[seen] = counts[seen]
        metrics = {"prototype_classes": float((self.counts > 0).sum())}
        metrics["class_proto_dist"] = mean_pair_distance(self.prototypes[self.counts > 0].double()[None])
        if len(slots) > 1:  # each group's prototypes of the round, [C, G, d], NaN where a group saw no sample
            group_counts = slots[:, cd:].T
            groups = slots[:, :cd].reshape(-1, self.classes, self.dim).transpose(0, 1) / group_counts[..., None]
            missing = group_counts[..., None] == 0
            metrics["group_proto_dist"] = mean_pair_distance(groups.masked_fill(missing, torch.nan))
        return metrics

    def server_state(self) -> dict[str, torch.Tensor]:
        return {"prototypes": self.prototypes, "counts": self.counts}

    def load_server_state(self, state: dict[str, torch.Tensor]) -> None:
        self.prototypes.copy_(state["prototypes"])
        self.counts.copy_(state["counts"])

    def global_state(self) -> dict[str, torch.Tensor]:
        return {"prototypes": self.prototypes.reshape(-1), "counts": self.counts}

    # -- client ---------------------------------------------------------------------------
    def _decode(self, payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prototypes [C, d], whether each class has one [C])."""
        cd = self.classes * self.dim
        return payload[:cd].reshape(self.classes, self.dim), payload[cd:] > 0

    def client_update(self, client: Client, payload: torch.Tensor) -> Update:
        model = self.personal.load(client)
        prototypes, present = self._decode(payload)
        ce, distance = self.train_prototypes(client, model, prototypes, present)
        self.personal.save(client, model)
        sums, counts = local_prototype_sums(model, *client.train, self.classes)
        payload = torch.zeros(self.up_numel(), dtype=torch.float64)
        start = self.setup.group_of(client.id) * self.slot
        payload[start : start + self.slot] = torch.cat([sums.reshape(-1), counts])
        return Update(payload, 1.0, {"train_loss": ce, "proto_loss": distance})

    def train_prototypes(
        self, client: Client, model: torch.nn.Module, prototypes: torch.Tensor, present: torch.Tensor
    ) -> tuple[float, float]:
        """The library loop on CE + lam * the distance to the global prototypes; (mean CE, mean distance) per
        batch. lam = 0 trains exactly as ``local`` does."""
        lam = self.params.lam
        prototypes, present = prototypes.to(client.train[0].device), present.to(client.train[0].device)

        def loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            features = model.base(batch.x)
            ce = F.cross_entropy(model.head(features), batch.y)
            distance = prototype_distance(features, batch.y, prototypes, present)
            return (ce + lam * distance if lam else ce), {"train_loss": ce, "proto_loss": distance}

        means = self.local_training(client, loss=loss)
        return means["train_loss"], means["proto_loss"]

    def load_for_eval(self, client: Client, payload: torch.Tensor) -> None:
        self.personal.load(client)
        self.eval_prototypes = self._decode(payload)

    def evaluate_client(self, client: Client) -> tuple[float, float, float, float]:
        """(cross-entropy of the client's head, accuracy of the nearest global prototype, then the head's
        cross-entropy and accuracy again: ``eval_metrics``) on its test split; the candidates are the classes of
        the client's training data that have a prototype."""
        model = self.setup.model_for(client.id)
        loss, head_acc = evaluate(model, *client.test)
        prototypes, present = self.eval_prototypes
        x, y = client.test
        present = present.to(x.device)
        own = present & (torch.bincount(client.train[1], minlength=self.classes) > 0)
        candidates = own if own.any() else present
        if not candidates.any():
            return loss, head_acc, loss, head_acc
        predicted = nearest_prototype(model, x, prototypes.to(x.device), candidates)
        return loss, float((predicted == y).float().mean()) if len(y) else 0.0, loss, head_acc
