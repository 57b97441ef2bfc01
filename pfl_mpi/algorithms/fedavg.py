"""FedAvg (McMahan et al., AISTATS 2017) with FedOpt server optimisers (Reddi et al., ICLR 2021).

Moves: the shared parameters w go down by Broadcast; each client's update w_k - w comes up as
a WeightedSum (weights by sample count or uniform). Computes: E local epochs of SGD from w on
each sampled client; on the server, the weighted mean update Delta is the pseudo-gradient of
the server optimiser (plain FedAvg: SGD with lr 1, w <- w + Delta).

Parameters that ``personal(name)`` selects never move: each client keeps its own copy as
state, so FedPer and LG-FedAvg are this class with a different ``personal``.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..models.params import ParamLayout, split_names
from .base import Algorithm, Broadcast, Client, Phase, Setup, Update, WeightedMean, WeightedSum
from .registry import register
from .server_opt import ServerOptConfig, ServerOptimizer
from .weighting import Weighting, client_weight


class FedAvgParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weighting: Weighting = Field(
        "samples", description="client weights: samples, uniform, quality or label_kl (see weighting.py)"
    )
    server_opt: ServerOptConfig = Field(default_factory=ServerOptConfig, description="server optimiser (FedOpt)")


@register
class FedAvg(Algorithm):
    name = "fedavg"
    Params = FedAvgParams
    down = Broadcast()
    up = WeightedSum()
    eval_down = Broadcast()  # clients are evaluated with w (and their personal parameters)

    def personal(self, param_name: str) -> bool:
        """Whether a parameter stays on its client. FedAvg shares everything."""
        return False

    def __init__(self, params: FedAvgParams, setup: Setup):
        super().__init__(params, setup)
        shared, personal = split_names(setup.model, self.personal)
        self.shared = ParamLayout(setup.model, shared)
        self.personal_layout = ParamLayout(setup.model, personal)
        self.initial_personal = self.personal_layout.flatten(setup.model)

    def down_numel(self) -> int:
        return self.shared.numel

    def up_numel(self) -> int:
        return self.shared.numel

    def client_state_spec(self, group: int) -> dict[str, int]:
        return {"personal": self.personal_layout.numel} if self.personal_layout.numel else {}

    def init_client_state(self, client_id: int) -> dict[str, torch.Tensor]:
        return {"personal": self.initial_personal.clone()} if self.personal_layout.numel else {}

    # -- server ---------------------------------------------------------------------------
    def init_server(self) -> None:
        self.w = self.shared.flatten(self.setup.model)
        self.optimizer = ServerOptimizer(self.params.server_opt, self.shared.numel, self.setup.rounds)

    def downlink(self, round: int, clients: list[int], phase: Phase) -> torch.Tensor:
        return self.w

    def aggregate(self, round: int, up: WeightedMean) -> dict[str, float]:
        self.optimizer.step(self.w, up.mean)
        return {"update_norm": float(up.mean.norm())}

    def server_state(self) -> dict[str, torch.Tensor]:
        return {"w": self.w, "opt": self.optimizer.state_dict()}

    def load_server_state(self, state: dict[str, torch.Tensor]) -> None:
        self.w.copy_(state["w"])
        self.optimizer.load_state_dict(state["opt"])

    def global_state(self) -> dict[str, torch.Tensor]:
        return {"shared": self.w}

    # -- client ---------------------------------------------------------------------------
    def _load(self, client: Client, payload: torch.Tensor) -> None:
        self.shared.load(self.setup.model, payload)
        if self.personal_layout.numel:
            self.personal_layout.load(self.setup.model, client.state["personal"])

    def client_update(self, client: Client, payload: torch.Tensor) -> Update:
        model = self.setup.model
        self._load(client, payload)
        loss = self.local_training(client)["train_loss"]
        if self.personal_layout.numel:
            client.state["personal"].copy_(self.personal_layout.flatten(model))
        delta = self.shared.flatten(model) - payload
        return Update(delta, client_weight(self.params.weighting, client, self.setup), {"train_loss": loss})

    def load_for_eval(self, client: Client, payload: torch.Tensor) -> None:
        self._load(client, payload)
