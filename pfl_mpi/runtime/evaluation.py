"""Evaluation rounds: every client's test metrics with the model it would use, and the optional extras.

Every client is evaluated on the rank that hosts it: the algorithm's evaluation downlink (``eval_down``,
``downlink(..., "eval")``; nothing when it declares none) goes down in blocks of clients, each client loads
its model (``load_for_eval``) and is scored (``evaluate_client``). After the last round with
``finetune_epochs``, each client then fine-tunes that model on its training split and is scored again
(``finetune_test_*``) without changing its state. An algorithm that declares ``evaluates_global`` also has
its global model scored on every client (``global_test_*``); an algorithm's own further metrics
(``eval_metrics``) come first. The two metrics of each score are the task's
(``setup.task``: loss and accuracy, or MSE and RMSE). The rows reach the server by one Gatherv.

Each model is scored on every held-out split of ``data.eval_on`` (``splits``: test, val), in the order of
``data.config.EVAL_SPLITS``, right after it is loaded or fine-tuned: the splits share one download and one
fine-tuning, and a split's columns are named after it (``record.eval_columns``: ``val_loss``, ``val_acc``,
``finetune_val_acc``, ...). Scoring is free of side effects, so the test columns are those of a run that
evaluates the test split alone.

With ``train.client_batch`` > 1 and an evaluation that is "load the client's parameters, score them"
(``block_eval.stacks_evaluation``), a rank's clients go in blocks of ``client_batch``: their parameters are
stacked, scored by one batched forward per chunk of test rows, fine-tuned by one batched training when the batched
loop can train them (else one after another), and scored again; see docs/batched.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from ..algorithms import Algorithm, Client, PerClient
from ..seeding import client_generator
from ..training.block_eval import evaluate_stack, finetune_stack, load_stack, stacks_evaluation
from ..training.stacked import blocks
from ..wire import WIRE_DTYPES
from ..wire.plan import Plan, make_plan
from ..wire.transport import Transport
from .record import eval_columns

EVAL_BLOCK_BYTES = 64 << 20  # at most this much of per-client evaluation payloads at once on the server


def on_split(client: Client, split: str) -> Client:
    """``client`` with the samples of ``split`` (test or val) where evaluation reads them (``client.test``); the
    same state and generator. The test split: ``client`` itself."""
    if split == "test":
        return client
    data = client.data
    return replace(client, data=replace(data, x_test=data.x_val, y_test=data.y_val))


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
        splits: tuple[str, ...] = ("test",),
        clients: np.ndarray | None = None,
    ):
        self.algo, self.transport, self.host, self.hosted = algo, transport, host, hosted
        self.client, self.seed, self.rounds, self.finetune_epochs = client, seed, rounds, finetune_epochs
        self.splits = splits
        self.size = transport.world.size
        # the clients evaluated (``hosted``: this rank's of them): all but the novel ones (runtime/novel.py)
        self.clients = np.arange(len(host)) if clients is None else np.asarray(clients, dtype=np.int64)
        self.all_clients = make_plan(self.clients, host, self.size)

    def __call__(self, t: int) -> tuple[np.ndarray | None, tuple[str, ...]]:
        """The rows of every client on the server (None elsewhere) and the names of their columns
        (``record.eval_columns``)."""
        algo = self.algo
        finetune = self.finetune_epochs if t == self.rounds - 1 else 0
        columns = eval_columns(algo.setup.task, self.splits, algo.eval_metrics, bool(finetune), algo.evaluates_global)
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
                rows[k] = self._client_row(self.client(k, t), payload, finetune)
        table = np.array([rows[k] for k in self.hosted], dtype=np.float64).reshape(len(self.hosted), len(columns))
        return self.transport.gather_rows(self.all_clients, table, "eval_metrics"), columns

    def _client_row(self, client: Client, payload: object, finetune: int) -> list[float]:
        """One client's row: per split, its samples, then the scores of its model, of that model fine-tuned
        (``finetune`` epochs) and of the global model (``evaluates_global``)."""
        algo = self.algo
        parts = {split: [float(on_split(client, split).data.y_test.shape[0])] for split in self.splits}
        algo.load_for_eval(client, payload)
        for split in self.splits:
            scores = list(algo.evaluate_client(on_split(client, split)))
            if len(scores) != 2 + len(algo.eval_metrics):
                raise ValueError(
                    f"{algo.name}: evaluate_client returned {len(scores)} values, expected {2 + len(algo.eval_metrics)}"
                )
            parts[split] += scores
        if finetune:
            self._prepare_finetune(client)
            algo.local_training(client, epochs=finetune)
            for split in self.splits:
                parts[split] += algo.evaluate_client(on_split(client, split))[:2]
        if algo.evaluates_global:
            algo.load_global_for_eval(client, payload)
            for split in self.splits:
                parts[split] += algo.evaluate_client(on_split(client, split))[:2]
        return [client.id, *(value for split in self.splits for value in parts[split])]

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
        parts = {
            (c.id, split): [float(on_split(c, split).data.y_test.shape[0])] for c in clients for split in self.splits
        }

        def score(params: dict) -> None:
            for split in self.splits:
                on = [on_split(c, split) for c in clients]
                for client, scores in zip(clients, evaluate_stack(algo, on, params), strict=True):
                    parts[client.id, split] += scores

        personal = load_stack(algo, clients, payloads, algo.load_for_eval)
        score(personal)
        if finetune:
            for client in clients:
                self._prepare_finetune(client)
            finetune_stack(algo, clients, personal, finetune)
            score(personal)
        if algo.evaluates_global:
            score(load_stack(algo, clients, payloads, algo.load_global_for_eval))
        return {c.id: [c.id, *(v for split in self.splits for v in parts[c.id, split])] for c in clients}

    def blocks(self) -> list[Plan]:
        """Every client, in blocks whose per-client evaluation payloads (PerClient) take at most
        ``EVAL_BLOCK_BYTES`` together: the server never builds N models' worth at once. One block otherwise."""
        down = self.algo.eval_down
        if not isinstance(down, PerClient):
            return [self.all_clients]
        itemsize = WIRE_DTYPES[down.dtype].itemsize
        clients = self.clients
        largest = max(self.algo.down_numel_of(int(k)) for k in clients) * itemsize
        block = max(1, EVAL_BLOCK_BYTES // max(largest, 1))
        return [make_plan(clients[i : i + block], self.host, self.size) for i in range(0, len(clients), block)]
