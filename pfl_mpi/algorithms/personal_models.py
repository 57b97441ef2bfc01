"""Each client's whole model, of its architecture group, kept as its state ``model`` (FedProto, FedMD, FedGKT)."""

from __future__ import annotations

import torch

from ..models import ParamLayout
from .base import Client, Setup


class PersonalModels:
    """Flat layouts of every architecture group, the initial models, and loading/saving a client's model."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.layouts = [ParamLayout(m, [n for n, _ in m.named_parameters()]) for m in setup.models]
        self.initial = [layout.flatten(m) for layout, m in zip(self.layouts, setup.models, strict=True)]

    def numel(self, group: int) -> int:
        """Floats of one model of architecture ``group`` (its state size)."""
        return self.layouts[group].numel

    def initial_state(self, client_id: int) -> torch.Tensor:
        """A copy of the initial model of ``client_id``'s group, flat."""
        return self.initial[self.setup.group_of(client_id)].clone()

    def load(self, client: Client) -> torch.nn.Module:
        """The model of the client's group, holding the client's own parameters."""
        model = self.setup.model_for(client.id)
        self.layouts[self.setup.group_of(client.id)].load(model, client.state["model"])
        return model

    def save(self, client: Client, model: torch.nn.Module) -> None:
        """Write ``model``'s parameters back into the client's state."""
        client.state["model"].copy_(self.layouts[self.setup.group_of(client.id)].flatten(model))
