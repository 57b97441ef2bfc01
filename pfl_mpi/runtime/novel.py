"""Novel clients: held out of training, served by their algorithm's rule after the last round.

``data.novel_clients`` holds out clients drawn from the data seed (``placement.novel_clients``): they are
partitioned and hosted like the others, but never sampled, so they never train, never send an update and never
weigh in an aggregate; the regular evaluation rounds leave them out. In the last round, after the regular
evaluation, :class:`NovelServing` serves each one (docs/novel_clients.md):

- an algorithm with ``serve_novel``: the evaluation downlink of the novel clients (``eval_down``: Bcast or
  Scatterv), then each client adapts what it got on its training split within the ``novel`` budget, alone, and is
  scored on its test split;
- an algorithm with ``novel_fit`` (pFedHN): ``novel.steps`` exchanges with the server, each a downlink (``down``)
  and an uplink (``up``) of the novel clients moved by the transport like a training round, then their evaluation
  downlink (``eval_down``) and the scores.

Each served model is scored on every split of ``data.eval_on`` (test, val), like the regular evaluation.

A novel client works on a copy of its state and draws from the generator of round ``rounds`` (never trained), as
the fine-tuning after the last round does; its stored state never changes. The rows reach the server by one
Gatherv (``eval_metrics``); the record gets, per split, ``novel_test_loss``/``novel_test_acc`` (``novel_val_*``;
the task's metrics: pooled over the novel clients by the split's samples, ``*_mean``/``*_std`` over clients) and
per client the same names and the protocol bytes of the serving (``protocol_novel_bytes_down``/``_up``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..algorithms import Algorithm, Client
from ..algorithms.novel_clients import NovelBudget
from ..seeding import client_generator
from ..wire.plan import make_plan
from ..wire.protocol import evaluation_bytes, training_bytes
from ..wire.transport import Transport
from .evaluation import on_split
from .novel_record import NovelRows
from .placement import training_clients

if TYPE_CHECKING:
    from ..config import RunConfig


def budget_of(cfg: RunConfig) -> NovelBudget:
    """The ``novel`` section of a run config, resolved (epochs None: train.local_epochs)."""
    epochs = cfg.train.local_epochs if cfg.novel.epochs is None else cfg.novel.epochs
    return NovelBudget(epochs=epochs, steps=cfg.novel.steps, lr=cfg.novel.lr)


class NovelServing:
    """Serves the novel clients of a run; every rank holds one and calls it in step (in the last round)."""

    def __init__(
        self,
        algo: Algorithm,
        transport: Transport,
        host: np.ndarray,
        client: Callable[[int, int], Client],
        cfg: RunConfig,
        novel: np.ndarray,
    ):
        """``client(k, t)``: client k in round t on its host; ``novel``: the sorted ids of the novel clients."""
        self.algo, self.transport, self.host, self.client = algo, transport, host, client
        self.seed, self.rounds, self.budget = cfg.seed, cfg.rounds, budget_of(cfg)
        self.splits = cfg.data.eval_splits
        self.novel = [int(k) for k in novel]
        self.trained = [int(k) for k in training_clients(len(host), novel)]
        self.plan = make_plan(np.asarray(self.novel, dtype=np.int64), host, transport.world.size)

    def _fresh(self, k: int, t: int) -> Client:
        """Client k as a novel client: a copy of its (never trained) state, the generator of round ``rounds``."""
        client = self.client(k, t)
        client.state = {name: v.clone() for name, v in client.state.items()}
        client.generator = client_generator(self.seed, k, self.rounds)
        return client

    def __call__(self, t: int) -> NovelRows | None:
        """Serve and score every novel client; the server gets the rows (None elsewhere)."""
        world, algo = self.transport.world, self.algo
        mine = self.plan.of_rank(world.rank)
        clients = [self._fresh(k, t) for k in mine]
        fit = algo.novel_fit(self.novel, self.trained, self.budget)
        if fit is None:
            scores = []
            for client, payload in zip(clients, self.transport.down(t, self.plan, "eval"), strict=True):
                algo.serve_novel(client, payload, self.budget)
                scores.append(self._scores(client))
            down = evaluation_bytes(algo, self.plan.order)
            up = np.zeros(len(self.plan.order), dtype=np.int64)
        else:
            scores, down, up = self._exchange(fit, t, clients)
        rows = np.array([[c.id, *s] for c, s in zip(clients, scores, strict=True)], dtype=np.float64)
        gathered = self.transport.gather_rows(
            self.plan, rows.reshape(len(clients), 1 + 3 * len(self.splits)), "eval_metrics"
        )
        return None if gathered is None else NovelRows(self.splits, gathered, down, up)

    def _scores(self, client: Client) -> list[float]:
        """Per split: its samples and the task's two metrics of the model loaded for ``client``."""
        out = []
        for split in self.splits:
            on = on_split(client, split)
            out += [float(on.data.y_test.shape[0]), *self.algo.evaluate_client(on)[:2]]
        return out

    def _exchange(self, fit, t: int, clients: list[Client]) -> tuple[list, np.ndarray, np.ndarray]:
        """``budget.steps`` exchanges of ``fit`` (down, the clients' ``client_update``, up, the server's
        ``aggregate``), then its evaluation downlink; this rank's clients' scores, the protocol bytes per client."""
        transport, order = Transport(self.transport.world, fit), self.plan.order
        ones = np.ones(len(order))
        for step in range(self.budget.steps):
            payloads = transport.down(step, self.plan, "train")
            uplink = transport.uplink_buffer([c.id for c in clients])
            for client, payload in zip(clients, payloads, strict=True):
                uplink.add(self.algo.client_update(client, payload))
            collected = transport.up(self.plan, uplink, ones)
            if transport.world.is_server:
                fit.aggregate(step, collected)
        scores = []
        for client, payload in zip(clients, transport.down(t, self.plan, "eval"), strict=True):
            self.algo.load_for_eval(client, payload)
            scores.append(self._scores(client))
        down, up = training_bytes(fit, order)
        return scores, down * self.budget.steps + evaluation_bytes(fit, order), up * self.budget.steps
