"""FedPer (Arivazhagan et al., 2019): base layers shared as in FedAvg, the head stays personal.

Moves: only the base parameters (Broadcast down, WeightedSum of updates up). The head (the
declared head: the ``model.head_layers`` final layers, or a user network's ``model.head``) is each
client's state and never leaves its rank.
Evaluation uses the global base with the client's own head.
"""

from __future__ import annotations

from ..models.split import in_head
from .fedavg import FedAvg
from .registry import register


@register
class FedPer(FedAvg):
    name = "fedper"

    def personal(self, param_name: str) -> bool:
        return in_head(self.setup.model, param_name)
