"""Evaluation rounds: every client's test metrics with the model it would use, and the optional extras.

Every client is evaluated on the rank that hosts it: the algorithm's evaluation downlink (``eval_down``,
``downlink(..., "eval")``; nothing when it declares none) goes down in blocks of clients, each client loads
its model (``load_for_eval``) and is scored (``evaluate_client``). After the last round with
``finetune_epochs``, each client then fine-tunes that model on its training split and is scored again
(``finetune_test_*``) without changing its state. An algorithm that declares ``evaluates_global`` also has
its global model scored on every client (``global_test_*``); an algorithm's own further metrics
(``eval_metrics``) come first. The two metrics of each score are the task's
(``setup.task``: loss and accuracy, or MSE and RMSE). The rows reach the server by one Gatherv.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..algorithms import Algorithm, Client, PerClient
from ..seeding import client_generator
from ..wire import WIRE_DTYPES
from ..wire.plan import Plan, make_plan
from ..wire.transport import Transport
from .record import EVAL_COLUMNS, extra_columns

EVAL_BLOCK_BYTES = 64 << 20  # at most this much of per-client evaluation payloads at once on the server


class Evaluator:
    """Evaluates every client of a run; every rank holds one and calls it in step."""

    def __init__(
        self,
        algo: Algorithm,
        transport: Transport,
        host: np.ndarray,
        hosted: list[int],
        client: Callable[[int, int], Client],
        seed: int,
        rounds: int,
        finetune_epochs: int,
    ):
        self.algo, self.transport, self.host, self.hosted = algo, transport, host, hosted
        self.client, self.seed, self.rounds, self.finetune_epochs = client, seed, rounds, finetune_epochs
        self.size = transport.world.size
        self.all_clients = make_plan(np.arange(len(host)), host, self.size)

    def __call__(self, t: int) -> tuple[np.ndarray | None, tuple[str, ...]]:
        """The rows (``EVAL_COLUMNS`` then the extra columns) of every client on the server (None elsewhere),
        and the names of the extra columns."""
        algo = self.algo
        finetune = self.finetune_epochs if t == self.rounds - 1 else 0
        extra = tuple(algo.eval_metrics) + extra_columns(algo.setup.task, bool(finetune), algo.evaluates_global)
        scored = 2 + len(algo.eval_metrics)  # what evaluate_client returns
        rows: dict[int, list[float]] = {}
        for plan in self.blocks():
            mine = plan.of_rank(self.transport.world.rank)
            for k, payload in zip(mine, self.transport.down(t, plan, "eval"), strict=True):
                client = self.client(k, t)
                algo.load_for_eval(client, payload)
                scores = list(algo.evaluate_client(client))
                if len(scores) != scored:
                    raise ValueError(f"{algo.name}: evaluate_client returned {len(scores)} values, expected {scored}")
                row = [k, client.data.y_test.shape[0], *scores]
                if finetune:
                    client.generator = client_generator(self.seed, k, self.rounds)  # a round never trained
                    client.state = {name: v.clone() for name, v in client.state.items()}  # kept as it was
                    algo.local_training(client, epochs=finetune)
                    row += algo.evaluate_client(client)[:2]
                if algo.evaluates_global:
                    algo.load_global_for_eval(client, payload)
                    row += algo.evaluate_client(client)[:2]
                rows[k] = row
        width = len(EVAL_COLUMNS) + len(extra)
        table = np.array([rows[k] for k in self.hosted], dtype=np.float64).reshape(len(self.hosted), width)
        return self.transport.gather_rows(self.all_clients, table, "eval_metrics"), extra

    def blocks(self) -> list[Plan]:
        """Every client, in blocks whose per-client evaluation payloads (PerClient) take at most
        ``EVAL_BLOCK_BYTES`` together: the server never builds N models' worth at once. One block otherwise."""
        down = self.algo.eval_down
        if not isinstance(down, PerClient):
            return [self.all_clients]
        itemsize = WIRE_DTYPES[down.dtype].itemsize
        clients = np.arange(len(self.host))
        largest = max(self.algo.down_numel_of(int(k)) for k in clients) * itemsize
        block = max(1, EVAL_BLOCK_BYTES // max(largest, 1))
        return [make_plan(clients[i : i + block], self.host, self.size) for i in range(0, len(clients), block)]
