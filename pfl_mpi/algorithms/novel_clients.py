"""Serving a client that never took part in training (``data.novel_clients``; docs/novel_clients.md).

Each algorithm that serves novel clients declares ``serves_novel`` and either ``serve_novel`` (the client adapts
what its evaluation downlink brought, alone, within the budget: :func:`fit_params`) or ``novel_fit`` (pFedHN: an
exchange with the server, :class:`EmbeddingFit`, the paper's generalisation experiment). No MPI here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..training.loop import clip_grad_norm_, evaluate
from ..training.optimizers import make_optimizer
from .base import Client, Gathered, PerClient, Phase

if TYPE_CHECKING:
    from ..wire import Collected
    from .base import Algorithm
    from .pfedhn import PFedHN


@dataclass(frozen=True)
class NovelBudget:
    """What a novel client may spend adapting (config ``novel``, resolved)."""

    epochs: int  # local epochs on its training split (novel.epochs; None there: train.local_epochs)
    steps: int  # pFedHN: embedding steps (novel.steps)
    lr: float | None  # novel.lr; None: the algorithm's own (train.lr; pFedHN: algorithm.lr)


def fit_params(algorithm: Algorithm, client: Client, params: list[torch.nn.Parameter], budget: NovelBudget) -> None:
    """Train ``params`` (the rest of the loaded model frozen) for ``budget.epochs`` epochs on the client's
    training split: the train section's optimiser at its round-0 learning rate (``budget.lr`` instead of train.lr
    if set), its state fresh, the task's loss. Nothing with 0 epochs."""
    if not budget.epochs or not params:
        return
    optimizer = make_optimizer(params, algorithm.setup.train, 0, 1, budget.lr)
    algorithm.local_training(client, params=params, epochs=budget.epochs, optimizer=optimizer)


def start_embedding(hnet: torch.nn.Module, trained: list[int] | None) -> torch.Tensor:
    """The embedding a novel client starts from: the mean of the embeddings of ``trained`` (None: all), [d]."""
    rows = hnet.embeddings.weight.detach()
    rows = rows if trained is None else rows[torch.as_tensor(trained, dtype=torch.long)]
    return rows.mean(dim=0).clone()


class EmbeddingFit:
    """pFedHN's novel clients, as an exchange the runtime moves like a training round (``Transport``): phi frozen,
    each novel client k gets its own embedding v_k (from the mean of the trained clients' embeddings), and every
    step sends theta_k = h(v_k; phi) down (PerClient), runs the client's local steps (``client_update`` on a copy
    of its state), brings delta_k up (Gathered) and moves only v_k: v_k <- v_k - lr * clip(J_vk^T delta_k).
    Built on every rank; ``downlink`` and ``aggregate`` run on the server only."""

    down = PerClient()
    eval_down = PerClient()
    up = Gathered()

    def __init__(self, algorithm: PFedHN, clients: list[int], trained: list[int] | None, budget: NovelBudget):
        self.algorithm, self.row = algorithm, {int(k): i for i, k in enumerate(clients)}  # client -> row of v
        self.lr = algorithm.params.lr if budget.lr is None else budget.lr
        self.v: torch.Tensor | None = None  # [len(clients), d] on the server
        self._graph: tuple[list[int], torch.Tensor, torch.Tensor] | None = None
        if hasattr(algorithm, "hnet"):  # the server
            start = start_embedding(algorithm.hnet, trained)
            self.v = start.expand(len(self.row), -1).clone().requires_grad_(True)

    def down_numel(self) -> int:
        return self.algorithm.down_numel()

    def up_numel(self) -> int:
        return self.algorithm.up_numel()

    def down_numel_of(self, client: int) -> int:
        return self.algorithm.down_numel_of(client)

    def up_numel_of(self, client: int) -> int:
        return self.algorithm.up_numel_of(client)

    def downlink(self, round: int, clients: list[int], phase: Phase) -> torch.Tensor:
        """theta_k = h(v_k; phi) of ``clients`` (novel ones); in "train" the graph to v is kept for ``aggregate``."""
        rows = torch.as_tensor([self.row[k] for k in clients], dtype=torch.long)
        if phase == "eval":
            with torch.no_grad():
                return self.algorithm.hnet.generate(self.v[rows])
        theta = self.algorithm.hnet.generate(self.v[rows])
        self._graph = (list(clients), rows, theta)
        return theta.detach()

    def aggregate(self, round: int, up: Collected) -> dict[str, float]:
        """One step of every novel client's embedding from its delta (each clipped to ``grad_clip`` alone)."""
        clients, rows, theta = self._graph
        if clients != list(up.clients):
            raise RuntimeError("novel clients: aggregate expects the clients of the last downlink")
        self._graph = None
        (grad,) = torch.autograd.grad(theta, self.v, grad_outputs=up.payloads.to(theta.dtype))
        with torch.no_grad():
            for i in rows.tolist():
                clip_grad_norm_([grad[i]], self.algorithm.params.grad_clip)
                self.v[i] -= self.lr * grad[i]
        return {}


def embedding_fit(algorithm: PFedHN, clients: list[int], trained: list[int], budget: NovelBudget) -> EmbeddingFit:
    """pFedHN's ``novel_fit``: an :class:`EmbeddingFit` of the novel ``clients``."""
    return EmbeddingFit(algorithm, clients, trained, budget)


def learn_novel_embedding(
    algorithm: PFedHN, client: Client, steps: int, lr: float, trained: list[int] | None = None
) -> tuple[torch.Tensor, list[float]]:
    """Generalisation to a novel client (the paper's experiment) in one process: phi frozen, only a new embedding
    v is learned, starting at the mean of the embeddings of ``trained`` (None: every client's).

    Each step is the federated protocol for that one client: theta = h(v; phi) goes down, the client runs its
    local steps (``client_update``: a PC client also trains its head, in ``client.state``), delta comes up, and
    only v moves: v <- v - lr * clip(J_v^T delta). Runs on the server's ``algorithm`` (``init_server`` done) with
    the client's data at hand. The runtime's :class:`EmbeddingFit` does the same for every novel client at once.

    Returns v ``[embedding_dim]`` and the client's training loss under h(v) before each step and after the last.
    """
    hnet = algorithm.hnet
    v = start_embedding(hnet, trained)[None].requires_grad_(True)
    model, losses = algorithm.setup.model, []

    def loss_of(theta: torch.Tensor) -> float:
        algorithm.load_for_eval(client, theta)
        return evaluate(model, *client.train)[0]

    for _ in range(steps):
        theta = hnet.generate(v)[0]
        losses.append(loss_of(theta.detach()))
        delta = algorithm.client_update(client, theta.detach()).payload
        (grad,) = torch.autograd.grad(theta, v, grad_outputs=delta.to(theta.dtype))
        with torch.no_grad():
            clip_grad_norm_([grad], algorithm.params.grad_clip)
            v -= lr * grad
    with torch.no_grad():
        losses.append(loss_of(hnet.generate(v)[0]))
    return v.detach()[0], losses
