"""LG-FedAvg (Liang et al., "Think Locally, Act Globally", 2020): local representations, a global head.

The reverse split of FedPer. Each client keeps its own representation (the ``base`` layers, its
state, never sent) and all clients share the classifier on top of it (the ``head``: the last
``model.head_layers`` layers, the paper's global layers ``num_layers_keep``).

Moves: only the head. The server broadcasts the global head theta^g (Broadcast, ``down_numel`` =
head parameters); each sampled client loads its own base and theta^g, trains both jointly for
``train.local_epochs`` epochs (the paper's device update), keeps its new base and sends its head
update theta^g_k - theta^g (WeightedSum, ``up_numel`` = head parameters); the server averages
(by ``weighting``; plain LG-FedAvg is server SGD with lr 1). Bytes per round: 4 * head numel down
per worker rank, 4 * (head numel + 1) up per worker rank. Evaluation uses each client's own base
under the global head (the paper's "local test").

Differences from the paper: the paper starts LG-FedAvg from a model pre-trained by FedAvg (whole
model communicated for some rounds); here every client's base starts from the same seeded
initialisation, because an algorithm's message sizes are fixed for the whole run. Run FedAvg first
and compare, if the warm start matters. The authors' code averages the head uniformly over the
sampled clients; ``weighting: samples`` (the default, as in FedAvg) is the same on equal-sized
clients (their shard splits) and ``weighting: uniform`` reproduces it otherwise.
"""

from __future__ import annotations

from ..models.split import in_head
from .fedavg import FedAvg
from .registry import register


@register
class LGFedAvg(FedAvg):
    name = "lgfedavg"

    def personal(self, param_name: str) -> bool:
        """The representation (base) stays on the client; the head is global."""
        return not in_head(self.setup.model, param_name)
