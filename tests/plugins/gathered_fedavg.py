"""FedAvg expressed with the other two message kinds: PerClient down (Scatterv), Gathered up (Gatherv).

Its results must equal FedAvg's; the tests use it to exercise the runtime's scatter and gather paths.
"""

from __future__ import annotations

import torch

from pfl_mpi.algorithms import Collected, Gathered, PerClient, Phase, register
from pfl_mpi.algorithms.fedavg import FedAvg


@register
class GatheredFedAvg(FedAvg):
    name = "gathered_fedavg"
    down = PerClient()
    eval_down = PerClient()
    up = Gathered()

    def downlink(self, round: int, clients: list[int], phase: Phase) -> torch.Tensor:
        return self.shared.w.expand(len(clients), -1)

    def aggregate(self, round: int, up: Collected) -> dict[str, float]:
        weights = up.weights / up.weights.sum()
        mean = (weights[:, None] * up.payloads).sum(dim=0)
        self.shared.optimizer.step(self.shared.w, mean)
        return {"update_norm": float(mean.norm())}
