"""Local training: every client trains its own model alone. Nothing moves.

The whole model is client state; evaluation uses it. The baseline that tells how much
federation helps (or hurts) on a given split.
"""

from __future__ import annotations

import torch

from ..models.params import ParamLayout
from .base import Algorithm, Client, Setup, Update
from .registry import register


@register
class Local(Algorithm):
    name = "local"
    down = None
    up = None

    def __init__(self, params, setup: Setup):
        super().__init__(params, setup)
        self.layout = ParamLayout(setup.model, [n for n, _ in setup.model.named_parameters()])
        self.initial = self.layout.flatten(setup.model)

    def client_state_spec(self, group: int) -> dict[str, int]:
        return {"model": self.layout.numel}

    def init_client_state(self, client_id: int) -> dict[str, torch.Tensor]:
        return {"model": self.initial.clone()}

    def client_update(self, client: Client, payload: None) -> Update:
        self.layout.load(self.setup.model, client.state["model"])
        loss = self.local_training(client)["train_loss"]
        client.state["model"].copy_(self.layout.flatten(self.setup.model))
        return Update(None, 1.0, {"train_loss": loss})

    def load_for_eval(self, client: Client, payload: None) -> None:
        self.layout.load(self.setup.model, client.state["model"])
