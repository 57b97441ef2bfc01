"""Local training: every client trains its own model alone. Nothing moves.

The whole model is client state; evaluation uses it. The baseline that tells how much
federation helps (or hurts) on a given split. Batched clients (``train.client_batch``): blocks of clients
train together (training/batched.py).
"""

from __future__ import annotations

import torch

from ..models.params import ParamLayout
from ..training.loop import Means
from .base import Algorithm, Client, Setup, Update
from .novel_clients import NovelBudget, fit_params
from .registry import register


@register
class Local(Algorithm):
    name = "local"
    down = None
    up = None
    serves_novel = True  # a model trained from scratch for the budget

    def __init__(self, params, setup: Setup):
        super().__init__(params, setup)
        self.layout = ParamLayout(setup.model, [n for n, _ in setup.model.named_parameters()])
        self.initial = self.layout.flatten(setup.model)

    def client_state_spec(self, group: int) -> dict[str, int]:
        return {"model": self.layout.numel}

    def init_client_state(self, client_id: int) -> dict[str, torch.Tensor]:
        return {"model": self.initial.clone()}

    # the client step, split for batched clients (training/batched.py)
    def begin_training(self, client: Client, payload: None) -> dict:
        self.layout.load(self.setup.model, client.state["model"])
        return {}

    def finish_training(self, client: Client, payload: None, means: Means) -> Update:
        client.state["model"].copy_(self.layout.flatten(self.setup.model))
        return Update(None, 1.0, {"train_loss": means["train_loss"]})

    def load_for_eval(self, client: Client, payload: None) -> None:
        self.layout.load(self.setup.model, client.state["model"])

    def serve_novel(self, client: Client, payload: None, budget: NovelBudget) -> None:
        """A model trained from its initialisation (the client's never-trained state) for ``budget.epochs``."""
        self.layout.load(self.setup.model, client.state["model"])
        fit_params(self, client, self.setup.params, budget)
