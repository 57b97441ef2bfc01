"""FedAvg (McMahan et al., AISTATS 2017) with FedOpt server optimisers (Reddi et al., ICLR 2021).

Moves: the shared parameters w go down by Broadcast; each client's update w_k - w comes up as
a WeightedSum (weights by sample count or uniform). Computes: E local epochs of SGD from w on
each sampled client; on the server, the weighted mean update Delta is the pseudo-gradient of
the server optimiser (plain FedAvg: SGD with lr 1, w <- w + Delta).

Parameters that ``personal(name)`` selects never move: each client keeps its own copy as
state, so FedPer and LG-FedAvg are this class with a different ``personal``. The shared model (the
split, w, the server optimiser, the checkpoint keys) is a component, ``SharedModel``, that the other
FedAvg-like algorithms hold too (``SharedModelAlgorithm``); they declare their own uplink and aggregate.

Batched clients (``train.client_batch``): the client step is split into ``begin_training`` (load w and the
personal parameters) and ``finish_training`` (keep the personal parameters, w_k - w), so a worker trains
blocks of clients together (training/batched.py); FedPer and LG-FedAvg inherit it.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..training.loop import Means
from .base import Client, Update, WeightedMean, WeightedSum
from .registry import register
from .server_opt import ServerOptConfig
from .shared_model import TrainsFromW
from .weighting import Weighting


class FedAvgParams(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")
    weighting: Weighting = Field(
        "samples", description="client weights: samples, uniform, quality or label_kl (see weighting.py)"
    )
    server_opt: ServerOptConfig = Field(default_factory=ServerOptConfig, description="server optimiser (FedOpt)")


@register
class FedAvg(TrainsFromW):
    """w down (and to evaluate), w_k - w up; the rest is ``SharedModelAlgorithm``'s (see shared_model.py)."""

    name = "fedavg"
    Params = FedAvgParams
    up = WeightedSum()

    def personal(self, param_name: str) -> bool:
        """Whether a parameter stays on its client. FedAvg shares everything."""
        return False

    def up_numel(self) -> int:
        return self.shared.numel

    def aggregate(self, round: int, up: WeightedMean) -> dict[str, float]:
        return self.shared.step(up.mean)

    # the client step is begin_training, the library's loop, finish_training: blocks of train.client_batch
    # clients train together (training/batched.py)
    def finish_training(self, client: Client, payload: torch.Tensor, means: Means) -> Update:
        delta, weight = self.trained(client, payload)
        return Update(delta, weight, {"train_loss": means["train_loss"]})
