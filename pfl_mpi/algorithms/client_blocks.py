"""Blocks of clients: an algorithm's client steps (``Algorithm.client_steps``) driven in lock-step, so that each
of their trainings runs for a whole block at once through the batched loop (``batched.batched_local_training``).

``Algorithm.client_updates`` calls :func:`train_in_blocks` when ``train.client_batch`` > 1 and the algorithm
declares its client steps. The evaluator (``runtime/evaluation.py``) evaluates and fine-tunes blocks of clients
through :func:`load_stack`, :func:`evaluate_stack` and :func:`finetune_stack` when :func:`stacks_evaluation`
allows it; see docs/batched.md.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence

import torch
from torch import nn

from . import batched
from .base import Algorithm, Client
from .batched import Stacked, blocks
from .optimizers import lr_factor
from .training import Means, cross_entropy, evaluate

BATCHED_OPTIONS = {"epochs", "generator", "lr", "params", "regulariser"}


def _signature(algo, client, options: dict, names_of: dict[int, str]) -> tuple | None:
    """What the clients of one block must share (trained names, lr, kind of regulariser), or None when this
    client's options need the sequential loop."""
    if set(options) - BATCHED_OPTIONS:
        return None
    regulariser = options.get("regulariser")
    if regulariser is not None and not isinstance(regulariser, batched.ProximalTerm):
        return None
    params = options.get("params", algo.setup.params_for(client.id))
    names = tuple(names_of[id(p)] for p in params)
    kind = None if regulariser is None else tuple(regulariser.names)
    return names, options.get("lr"), kind


def _advance(steps: Generator, means: Means | None) -> tuple[dict | None, object]:
    """Run a client's steps to its next training: (its options, None), or (None, its Update) when it is done."""
    try:
        return steps.send(means), None
    except StopIteration as done:
        return None, done.value


def train_in_blocks(algo, clients: Sequence, payloads: Sequence) -> Iterator:
    """``algo``'s updates of ``clients`` (in order), blocks of ``setup.client_batch`` clients trained together.

    Each client's ``client_steps`` runs to its first training: it loads its start into the model and yields the
    options, and its start is copied into the block's stacks. Clients whose options the batched loop cannot run
    (see ``batchable``, ``BATCHED_OPTIONS``) or that differ from the block's (trained parameters, lr,
    regulariser) train at once, alone, as in the sequential path. The block trains; each client's trained
    parameters are loaded into the model and its steps resume with its means, up to its next training (a
    further pass of the block: FedRep's body after its head, Ditto's v after w) or its Update."""
    setup = algo.setup
    for block in blocks(list(zip(clients, payloads, strict=True)), setup.client_batch):
        model = setup.model_for(block[0][0].id)
        named = list(model.named_parameters())
        names_of = {id(p): n for n, p in named}
        steps = [algo.client_steps(client, payload) for client, payload in block]
        done: list = [None] * len(block)
        waiting = list(range(len(block)))  # clients whose steps have not started
        resumed: list[tuple] = []  # (client, the means of its last training, its trained parameters)
        while waiting or resumed:
            group: list[tuple[int, dict]] = []
            stacks = {n: p.new_empty(len(block), *p.shape) for n, p in named}
            signature = None
            for i, means, trained in [(i, None, None) for i in waiting] + resumed:
                if trained is not None:
                    with torch.no_grad():
                        for n, p in named:
                            p.copy_(trained[n])
                options, done[i] = _advance(steps[i], means)
                while options is not None:  # a training the block cannot share: alone, now
                    client = block[i][0]
                    own = _signature(algo, client, options, names_of)
                    why = batched.batchable(
                        model, setup.train, *client.train, augment=setup.augment, loss=_task_loss(setup)
                    )
                    alike = setup.model_for(client.id) is model and own == (signature or own)
                    if own is not None and why is None and alike:
                        break
                    options, done[i] = _advance(steps[i], algo.train_with(client, options))
                if options is None:
                    continue
                signature = own
                with torch.no_grad():
                    for n, p in named:
                        stacks[n][len(group)].copy_(p)
                group.append((i, options))
            waiting, resumed = [], []
            if group:
                params = {n: t[: len(group)] for n, t in stacks.items()}
                means = _train_group(algo, model, block, group, params, signature)
                resumed = [(i, means[j], {n: t[j] for n, t in params.items()}) for j, (i, _) in enumerate(group)]
        yield from done


def _task_loss(setup):
    """The setup's default training loss when it is not the cross-entropy of ``training.cross_entropy``."""
    loss = getattr(setup, "loss", None) or getattr(getattr(setup, "task", None), "loss", None)
    return None if loss is None or loss is cross_entropy else loss


def _train_group(algo, model: nn.Module, block: list, group: list, params: Stacked, signature: tuple) -> list[Means]:
    """Train the block's clients ``group`` ((position, options) pairs) together; their means."""
    setup, cfg = algo.setup, algo.setup.train
    names, lr, kind = signature
    first = block[group[0][0]][0]
    step = (cfg.lr if lr is None else lr) * lr_factor(cfg.schedule, first.round, setup.rounds)
    clients = [block[i][0] for i, _ in group]
    epochs = [options.get("epochs", cfg.local_epochs) for _, options in group]
    regulariser = (
        None if kind is None else batched.ProximalTerm.stacked([options["regulariser"] for _, options in group])
    )
    return batched.batched_local_training(
        model,
        params,
        [c.train for c in clients],
        [options.get("generator", c.generator) for c, (_, options) in zip(clients, group, strict=True)],
        cfg,
        step,
        trainable=names,
        epochs=epochs,
        regulariser=regulariser,
    )


# -- evaluation and fine-tuning of a block ------------------------------------------------------
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
    return (x.device.type != "cpu" or y.shape[0] <= EVAL_CPU_ROWS) and batched.evaluable(model, x, y) is None


def evaluate_stack(algo: Algorithm, clients: Sequence[Client], params: Stacked) -> list[tuple[float, float]]:
    """(test loss, test accuracy) of each client with its slice of ``params``: the clients with classification
    test splits (on a CPU: of at most ``EVAL_CPU_ROWS`` rows) by batched forwards (``batched.batched_evaluate``),
    the others one after another (``evaluate_client``)."""
    model = algo.setup.model
    together = [i for i, c in enumerate(clients) if _scored_in_block(model, c)]
    scores: list[tuple[float, float] | None] = [None] * len(clients)
    if together:
        own = params if len(together) == len(clients) else {n: t[together] for n, t in params.items()}
        scored = batched.batched_evaluate(model, own, [clients[i].test for i in together])
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
        batched.batchable(model, cfg, *c.train, augment=setup.augment, loss=_task_loss(setup)) is not None
        for c in clients
    )
    if not alone:
        lr = cfg.lr * lr_factor(cfg.schedule, clients[0].round, setup.rounds)
        batched.batched_local_training(
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
