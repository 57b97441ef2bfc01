"""Blocks of clients: an algorithm's client steps (``Algorithm.client_steps``) driven in lock-step, so that each
of their trainings runs for a whole block at once through the batched loop (``batched.batched_local_training``).

``Algorithm.client_updates`` calls :func:`train_in_blocks` when ``train.client_batch`` > 1 and the algorithm
declares its client steps; evaluation and fine-tuning of blocks are in ``block_eval.py``; see docs/batched.md.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence

import torch
from torch import nn

from .batched import batchable, batched_local_training, task_loss
from .loop import Means
from .optimizers import lr_factor
from .proximal import ProximalTerm
from .stacked import Stacked, blocks

BATCHED_OPTIONS = {"epochs", "generator", "lr", "params", "regulariser"}


def _signature(algo, client, options: dict, names_of: dict[int, str]) -> tuple | None:
    """What the clients of one block must share (trained names, lr, kind of regulariser), or None when this
    client's options need the sequential loop."""
    if set(options) - BATCHED_OPTIONS:
        return None
    regulariser = options.get("regulariser")
    if regulariser is not None and not isinstance(regulariser, ProximalTerm):
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
    regulariser) train at once, alone, as in the sequential path. The block trains; the model shows each client's
    trained parameters (its parameters' ``data`` are the block's slices of that client, until the block ends) and
    its steps resume with its means, up to its next training (a
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
        own_data = [p.data for _, p in named]
        try:
            while waiting or resumed:
                group: list[tuple[int, dict]] = []
                stacks = {n: p.new_empty(len(block), *p.shape) for n, p in named}
                signature = None
                for i, means, trained in [(i, None, None) for i in waiting] + resumed:
                    if trained is not None:  # the model shows the client's trained parameters (no copy)
                        for n, p in named:
                            p.data = trained[n]
                    options, done[i] = _advance(steps[i], means)
                    while options is not None:  # a training the block cannot share: alone, now
                        client = block[i][0]
                        own = _signature(algo, client, options, names_of)
                        why = batchable(model, setup.train, *client.train, augment=setup.augment, loss=task_loss(setup))
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
        finally:
            _own_data_back(named, own_data)
        yield from done


@torch.no_grad()
def _own_data_back(named: list[tuple[str, nn.Parameter]], own_data: list[torch.Tensor]) -> None:
    """The model's parameters back on their own tensors, holding what the model showed last (as if each client's
    trained parameters had been copied into the model)."""
    for (_, p), data in zip(named, own_data, strict=True):
        if p.data_ptr() != data.data_ptr():
            data.copy_(p)
            p.data = data


def _train_group(algo, model: nn.Module, block: list, group: list, params: Stacked, signature: tuple) -> list[Means]:
    """Train the block's clients ``group`` ((position, options) pairs) together; their means."""
    setup, cfg = algo.setup, algo.setup.train
    names, lr, kind = signature
    first = block[group[0][0]][0]
    step = (cfg.lr if lr is None else lr) * lr_factor(cfg.schedule, first.round, setup.rounds)
    clients = [block[i][0] for i, _ in group]
    epochs = [options.get("epochs", cfg.local_epochs) for _, options in group]
    regulariser = None if kind is None else ProximalTerm.stacked([options["regulariser"] for _, options in group])
    return batched_local_training(
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
