"""Evaluation rounds: every client's test metrics with the model it would use, and the optional extras.

Every client is evaluated on the rank that hosts it: the algorithm's evaluation downlink (``eval_down``,
``downlink(..., "eval")``; nothing when it declares none) goes down in blocks of clients, each client loads
its model (``load_for_eval``) and is scored (``evaluate_client``). After the last round with
``finetune_epochs``, each client then fine-tunes that model on its training split and is scored again
(``finetune_test_*``) without changing its state. An algorithm that declares ``evaluates_global`` also has
its global model scored on every client (``global_test_*``); an algorithm's own further metrics
(``eval_metrics``) come first. The two metrics of each score are the task's
(``setup.task``: loss and accuracy, or MSE and RMSE). The rows reach the server by one Gatherv.

With ``train.client_batch`` > 1 and an evaluation that is "load the client's parameters, score them"
(``block_eval.stacks_evaluation``), a rank's clients go in blocks of ``client_batch``: their parameters are
stacked, scored by one batched forward per chunk of test rows, fine-tuned by one batched training when the batched
loop can train them (else one after another), and scored again; see docs/batched.md.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..algorithms import Algorithm, Client, PerClient
from ..seeding import client_generator
from ..training.block_eval import evaluate_stack, finetune_stack, load_stack, stacks_evaluation
from ..training.stacked import blocks
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
        in_blocks = stacks_evaluation(algo)
        for plan in self.blocks():
            mine = plan.of_rank(self.transport.world.rank)
            pairs = list(zip(mine, self.transport.down(t, plan, "eval"), strict=True))
            if in_blocks:
                for block in blocks(pairs, algo.setup.client_batch):
                    rows.update(self._block_rows(block, t, finetune))
                continue
            for k, payload in pairs:
                client = self.client(k, t)
                algo.load_for_eval(client, payload)
                scores = list(algo.evaluate_client(client))
                if len(scores) != scored:
                    raise ValueError(f"{algo.name}: evaluate_client returned {len(scores)} values, expected {scored}")
                row = [k, client.data.y_test.shape[0], *scores]
                if finetune:
                    self._prepare_finetune(client)
                    algo.local_training(client, epochs=finetune)
                    row += algo.evaluate_client(client)[:2]
                if algo.evaluates_global:
                    algo.load_global_for_eval(client, payload)
                    row += algo.evaluate_client(client)[:2]
                rows[k] = row
        width = len(EVAL_COLUMNS) + len(extra)
        table = np.array([rows[k] for k in self.hosted], dtype=np.float64).reshape(len(self.hosted), width)
        return self.transport.gather_rows(self.all_clients, table, "eval_metrics"), extra

    def _prepare_finetune(self, client: Client) -> None:
        """Fine-tuning trains from a generator of a round never trained and leaves the client's state as it was."""
        client.generator = client_generator(self.seed, client.id, self.rounds)
        client.state = {name: v.clone() for name, v in client.state.items()}

    def _block_rows(self, block: list[tuple[int, object]], t: int, finetune: int) -> dict[int, list[float]]:
        """The rows of a block of ``client_batch`` clients ((id, payload) pairs), evaluated together: each client's
        parameters are loaded and stacked, then scored by batched forwards and fine-tuned by one batched training
        (``block_eval``); equal to the one-by-one rows up to float rounding of the losses."""
        algo = self.algo
        clients = [self.client(k, t) for k, _ in block]
        payloads = [payload for _, payload in block]
        personal = load_stack(algo, clients, payloads, algo.load_for_eval)
        scored = evaluate_stack(algo, clients, personal)
        rows = {c.id: [c.id, c.data.y_test.shape[0], *s] for c, s in zip(clients, scored, strict=True)}
        if finetune:
            for client in clients:
                self._prepare_finetune(client)
            finetune_stack(algo, clients, personal, finetune)
            for client, scores in zip(clients, evaluate_stack(algo, clients, personal), strict=True):
                rows[client.id] += scores
        if algo.evaluates_global:
            shared = load_stack(algo, clients, payloads, algo.load_global_for_eval)
            for client, scores in zip(clients, evaluate_stack(algo, clients, shared), strict=True):
                rows[client.id] += scores
        return rows

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
