"""Serving a client that never took part in training (the pFedHN paper's generalisation experiment)."""

from __future__ import annotations

import torch

from ..training.loop import clip_grad_norm_, evaluate
from .base import Client
from .pfedhn import PFedHN


def learn_novel_embedding(algorithm: PFedHN, client: Client, steps: int, lr: float) -> tuple[torch.Tensor, list[float]]:
    """Generalisation to a novel client (the paper's experiment): phi frozen, only a new embedding v is learned.

    Each step is the federated protocol for that one client: theta = h(v; phi) goes down, the client runs its
    local steps (``client_update``: a PC client also trains its head, in ``client.state``), delta comes up, and
    only v moves: v <- v - lr * clip(J_v^T delta). v starts at the mean of the learned embeddings. Runs in one
    process, on the server's ``algorithm`` (``init_server`` done) with the client's data at hand.

    Returns v ``[embedding_dim]`` and the client's training loss under h(v) before each step and after the last.
    """
    hnet = algorithm.hnet
    v = hnet.embeddings.weight.detach().mean(dim=0, keepdim=True).clone().requires_grad_(True)
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
