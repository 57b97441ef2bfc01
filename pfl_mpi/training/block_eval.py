"""Evaluation and fine-tuning of a block of clients: their parameters stacked, scored together by batched
forwards (``batched_eval``) and fine-tuned together by the batched loop (``batched``) where these reproduce the
one-by-one results; see docs/batched.md."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..algorithms.base import Algorithm, Client
from .batched import batchable, batched_local_training, task_loss
from .batched_eval import batched_evaluate, evaluable
from .loop import evaluate
from .optimizers import lr_factor
from .stacked import Stacked


def stacks_evaluation(algo: Algorithm) -> bool:
    """Whether the evaluator evaluates ``algo``'s clients in blocks of ``client_batch`` (> 1): its evaluation is
    "load the client's parameters, score them with classification's ``evaluate``" (``evaluate_client`` not
    overridden, no ``eval_metrics``), of one architecture without buffers, so a client's scores are a function of
    its parameters alone."""
    setup = algo.setup
    return (
        setup.client_batch > 1
        and type(algo).evaluate_client is Algorithm.evaluate_client
        and not algo.eval_metrics
        and setup.task.evaluate is evaluate
        and setup.num_groups == 1
        and not any(True for _ in setup.model.buffers())
    )


def load_stack(
    algo: Algorithm, clients: Sequence[Client], payloads: Sequence, load: Callable[[Client, object], None]
) -> Stacked:
    """The parameters that ``load(client, payload)`` (``load_for_eval``, ``load_global_for_eval``) puts into the
    model for each client, stacked ``[K, ...]`` in ``clients`` order."""
    named = list(algo.setup.model.named_parameters())
    stacks = {n: p.new_empty(len(clients), *p.shape) for n, p in named}
    for i, (client, payload) in enumerate(zip(clients, payloads, strict=True)):
        load(client, payload)
        with torch.no_grad():
            for n, p in named:
                stacks[n][i].copy_(p)
    return stacks


def _load_row(model: nn.Module, params: Stacked, i: int) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n][i])


EVAL_CPU_ROWS = 32
"""On a CPU, a client with more test rows is scored alone: its sequential forward is one efficient GEMM per layer,
and the batched one was measured slower there (docs/batched.md); the choice depends on the client alone."""


def _scored_in_block(model: nn.Module, client: Client) -> bool:
    x, y = client.test
    return (x.device.type != "cpu" or y.shape[0] <= EVAL_CPU_ROWS) and evaluable(model, x, y) is None


def evaluate_stack(algo: Algorithm, clients: Sequence[Client], params: Stacked) -> list[tuple[float, float]]:
    """(test loss, test accuracy) of each client with its slice of ``params``: the clients with classification
    test splits (on a CPU: of at most ``EVAL_CPU_ROWS`` rows) by batched forwards (``batched.batched_evaluate``),
    the others one after another (``evaluate_client``)."""
    model = algo.setup.model
    together = [i for i, c in enumerate(clients) if _scored_in_block(model, c)]
    scores: list[tuple[float, float] | None] = [None] * len(clients)
    if together:
        own = params if len(together) == len(clients) else {n: t[together] for n, t in params.items()}
        scored = batched_evaluate(model, own, [clients[i].test for i in together])
        for i, score in zip(together, scored, strict=True):
            scores[i] = score
    for i, client in enumerate(clients):
        if scores[i] is None:
            _load_row(model, params, i)
            scores[i] = tuple(algo.evaluate_client(client)[:2])
    return scores


def finetune_stack(algo: Algorithm, clients: Sequence[Client], params: Stacked, epochs: int) -> None:
    """Fine-tune each client's slice of ``params`` in place: ``local_training(client, epochs=epochs)`` from it,
    with the client's generator. One batched training (``batched.batched_local_training``) when the batched loop
    trains these clients exactly (``batched.batchable``; ``local_training`` not overridden), else one after another."""
    setup = algo.setup
    model, cfg = setup.model, setup.train
    alone = type(algo).local_training is not Algorithm.local_training or any(
        batchable(model, cfg, *c.train, augment=setup.augment, loss=task_loss(setup)) is not None for c in clients
    )
    if not alone:
        lr = cfg.lr * lr_factor(cfg.schedule, clients[0].round, setup.rounds)
        batched_local_training(
            model,
            params,
            [c.train for c in clients],
            [c.generator for c in clients],
            cfg,
            lr,
            epochs=[epochs] * len(clients),
        )
        return
    for i, client in enumerate(clients):
        _load_row(model, params, i)
        algo.local_training(client, epochs=epochs)
        with torch.no_grad():
            for n, p in model.named_parameters():
                params[n][i].copy_(p)
