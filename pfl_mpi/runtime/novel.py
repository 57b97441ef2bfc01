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

A novel client works on a copy of its state and draws from the generator of round ``rounds`` (never trained), as
the fine-tuning after the last round does; its stored state never changes. The rows reach the server by one
Gatherv (``eval_metrics``); the record gets ``novel_test_loss``/``novel_test_acc`` (the task's metrics: pooled
over the novel clients by test samples, ``*_mean``/``*_std`` over clients) and per client the same names and the
protocol bytes of the serving (``protocol_novel_bytes_down``/``_up``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..algorithms import Algorithm, Client
from ..algorithms.novel_clients import NovelBudget
from ..seeding import client_generator
from ..training.tasks import Task
from ..wire.plan import make_plan
from ..wire.protocol import evaluation_bytes, training_bytes
from ..wire.transport import Transport
from .placement import training_clients

if TYPE_CHECKING:
    from ..config import RunConfig

PREFIX = "novel_test_"  # the task's two metrics of a novel client: novel_test_loss, novel_test_acc


def budget_of(cfg: RunConfig) -> NovelBudget:
    """The ``novel`` section of a run config, resolved (epochs None: train.local_epochs)."""
    epochs = cfg.train.local_epochs if cfg.novel.epochs is None else cfg.novel.epochs
    return NovelBudget(epochs=epochs, steps=cfg.novel.steps, lr=cfg.novel.lr)


@dataclass
class NovelRows:
    """What the server records of the novel clients: per client (``clients`` order) its id, test samples and
    the task's two metrics, and the protocol bytes its serving downloaded and uploaded."""

    rows: np.ndarray  # [n, 4]: client, num_test, loss, score
    bytes_down: np.ndarray  # int64 [n]
    bytes_up: np.ndarray  # int64 [n]


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
                scores.append(algo.evaluate_client(client)[:2])
            down = evaluation_bytes(algo, self.plan.order)
            up = np.zeros(len(self.plan.order), dtype=np.int64)
        else:
            scores, down, up = self._exchange(fit, t, clients)
        rows = [[c.id, c.data.y_test.shape[0], *s] for c, s in zip(clients, scores, strict=True)]
        rows = np.array(rows, dtype=np.float64).reshape(len(clients), 4)
        gathered = self.transport.gather_rows(self.plan, rows, "eval_metrics")
        return None if gathered is None else NovelRows(gathered, down, up)

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
            scores.append(self.algo.evaluate_client(client)[:2])
        down, up = training_bytes(fit, order)
        return scores, down * self.budget.steps + evaluation_bytes(fit, order), up * self.budget.steps


def novel_record(task: Task, novel: NovelRows, num_clients: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The round scalars and [N] per-client arrays of the served novel clients."""
    ids, n_test, loss, score = (novel.rows[:, i] for i in range(4))
    ids = ids.astype(np.int64)
    loss_name, score_name = task.columns(PREFIX)
    clients = {loss_name: np.full(num_clients, np.nan), score_name: np.full(num_clients, np.nan)}
    clients[loss_name][ids], clients[score_name][ids] = loss, score
    down, up = np.zeros(num_clients, dtype=np.int64), np.zeros(num_clients, dtype=np.int64)
    down[ids], up[ids] = novel.bytes_down, novel.bytes_up  # both in the plan's order
    clients["protocol_novel_bytes_down"], clients["protocol_novel_bytes_up"] = down, up
    pooled = float(np.sum(n_test * loss) / np.sum(n_test))
    scalars = {
        loss_name: pooled,
        score_name: task.pooled_score(pooled, float(np.sum(n_test * score) / np.sum(n_test))),
        f"{score_name}_mean": float(np.mean(score)),
        f"{score_name}_std": float(np.std(score)),
        "protocol_bytes_novel": float(down.sum() + up.sum()),
    }
    return scalars, clients


def novel_metric_names(task: Task) -> tuple[str, ...]:
    """The per-round names the novel clients' serving records (for reports)."""
    loss_name, score_name = task.columns(PREFIX)
    return (loss_name, score_name, f"{score_name}_mean", f"{score_name}_std")
