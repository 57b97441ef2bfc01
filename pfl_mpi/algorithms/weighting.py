"""How much each client's payload counts in a linear aggregate.

A linear algorithm (``up = WeightedSum()``) returns, with each client's payload p_k, an unnormalised
weight a_k. Each worker pre-sums a_k p_k and a_k over its own clients, one Reduce adds the ranks' sums,
and the server divides: it gets sum_k a_k p_k / sum_k a_k over the clients that reported this round.
So a_k must be computable on the client's worker, from what that worker holds: the client's data,
its trained model and what every rank knows (``Setup``). Every strategy below is; none needs a message.

Strategies (n_k = the client's training samples, the size of the sum over its training split):

``samples``
    a_k = n_k. FedAvg's p_k = n_k / n (McMahan et al., 2017).
``uniform``
    a_k = 1: every reporting client counts the same (FedRep's Algorithm 1, the authors' LG-FedAvg code).
``quality``
    Update quality, a_k = n_k * exp(-L_k), where L_k is the mean cross-entropy of the client's model
    *after* its local training, on its whole training split (the model in ``setup.model`` when
    ``client_weight`` is called). exp(-L_k) is the geometric mean of the probability the trained model
    gives to the true labels, in (0, 1]: a client whose local training fits its data (consistent labels,
    stable steps) counts fully; one whose training leaves a high loss (noisy or contradictory labels, a
    diverging or cut-short update) is damped, smoothly and without a threshold. It costs one forward
    pass over the client's training split. Caveats: the loss is measured on the data the client trained
    on (see below), and under label skew a client with few classes reaches a lower loss than one with
    many, so ``quality`` then leans towards the narrow clients (``label_kl`` leans the other way).
``label_kl``
    Label-distribution divergence, a_k = n_k * exp(-KL(q_k || P)), where q_k is the client's training
    label histogram (normalised) and P the class frequencies of all clients' training data
    (``Setup.label_distribution``, on every rank before round 1). KL is in nats, with 0 log 0 = 0; it is
    finite, because P_c >= n_k q_kc / n > 0 wherever q_kc > 0. exp(-KL) = prod_c (P_c / q_kc)^q_kc is in
    (0, 1], equals 1 exactly when q_k = P, and for a client holding only class c equals P_c; a client
    with m equally frequent classes under a uniform P over C classes gets m / C. Clients whose labels
    look like the population count fully; skewed clients are damped in proportion to how much of the
    label distribution they miss.

Why not a held-out part of the training split for ``quality``: algorithms train with
``Algorithm.local_training``, which always uses the client's whole training split (``Client.train``), so no
part of it stays unseen by the model being scored. A validation split held out of training would need
the data layer (``ClientData``) or ``local_training`` to provide one; with it, ``quality`` would evaluate there.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .base import Client, Setup

Weighting = Literal["samples", "uniform", "quality", "label_kl"]

NEEDS_SETUP: frozenset[str] = frozenset({"quality", "label_kl"})
"""Strategies that read ``Setup`` (the trained model or the global label distribution)."""


def client_weight(strategy: Weighting, client: Client, setup: Setup | None = None) -> float:
    """The unnormalised weight a_k of ``client`` under ``strategy`` (see the module docstring).

    Call it after the client's local training, with the client's trained parameters loaded in
    ``setup.model``; ``setup`` is required by ``quality`` and ``label_kl``.
    """
    n = float(client.num_train)
    if strategy == "samples":
        return n
    if strategy == "uniform":
        return 1.0
    if strategy in NEEDS_SETUP and setup is None:
        raise ValueError(f"weighting {strategy!r} needs the Setup: call client_weight(strategy, client, setup)")
    if strategy == "quality":
        loss, _ = setup.task.evaluate(setup.model, *client.train)  # the task's loss
        return n * math.exp(-loss)
    if strategy == "label_kl":
        return n * math.exp(
            -label_kl(label_histogram(client.data.y_train, setup.num_classes), setup.label_distribution)
        )
    raise ValueError(f"unknown weighting {strategy!r}")


def label_histogram(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class frequencies of labels ``y`` (float64, sums to 1; all zeros for no labels)."""
    counts = torch.bincount(y.detach().reshape(-1).cpu(), minlength=num_classes).double()
    return counts / counts.sum().clamp_min(1.0)


def label_kl(q: torch.Tensor, p: torch.Tensor) -> float:
    """KL(q || p) in nats over the classes where q > 0 (0 log 0 = 0); inf if p is 0 where q is not."""
    q, p = q.double().cpu(), p.double().cpu()
    support = q > 0
    qs, ps = q[support], p[support]
    if bool((ps <= 0).any()):
        return math.inf
    return float((qs * (qs / ps).log()).sum())
