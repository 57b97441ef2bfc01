"""A plugin for the end-to-end tests: FedAvg that fails or diverges on purpose (``plugins: [faulty_algorithms]``)."""

from __future__ import annotations

from pfl_mpi.algorithms import Client, Update, register
from pfl_mpi.algorithms.fedavg import FedAvg, FedAvgParams


class FaultyParams(FedAvgParams):
    fail_client: int = -1  # raise in client_update of this client ...
    fail_round: int = -1  # ... in this round (-1: the first round it trains)
    nan_round: int = -1  # every client reports a NaN loss in this round


@register
class Faulty(FedAvg):
    name = "faulty"
    Params = FaultyParams

    def client_update(self, client: Client, payload) -> Update:
        if client.id == self.params.fail_client and self.params.fail_round in (-1, client.round):
            raise RuntimeError(f"injected failure in client {client.id}")
        update = super().client_update(client, payload)
        if client.round == self.params.nan_round:
            update.metrics["train_loss"] = float("nan")
        return update
