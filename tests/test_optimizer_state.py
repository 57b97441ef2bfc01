"""train.optimizer_state: keep carries each client's optimiser state across rounds (one optimiser that never
restarts), is checkpointed and resumes exactly; reset (the default) starts fresh every round."""

from __future__ import annotations

import copy

import h5py
import numpy as np
import pytest
import torch

from pfl_mpi.algorithms import Client
from pfl_mpi.algorithms.base import OPTIMIZER_STATE
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.runtime import Engine
from pfl_mpi.seeding import client_generator
from pfl_mpi.store import read_summary
from pfl_mpi.training.loop import SGD, TorchOptimizer, local_training
from tests.helpers import build_algorithm, tiny_config


@pytest.mark.parametrize(
    "sets,reference",
    [
        ({"train.optimizer": "adam", "train.lr": 0.01}, lambda ps: TorchOptimizer(torch.optim.Adam(ps, lr=0.01), ps)),
        ({"train.optimizer": "adamw", "train.lr": 0.01, "train.weight_decay": 0.1}, None),
        ({"train.momentum": 0.9}, lambda ps: SGD(ps, 0.1, momentum=0.9)),
    ],
    ids=["adam", "adamw", "sgd-momentum"],
)
def test_kept_state_continues_one_optimiser_across_rounds(tmp_path, sets, reference):
    """Three rounds of one client with keep equal one optimiser (never rebuilt) stepping through the same
    batches; with reset the second round differs."""
    if reference is None:
        reference = lambda ps: TorchOptimizer(torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1), ps)  # noqa: E731
    keep = tiny_config(tmp_path / "k.h5", **{"train.optimizer_state": "keep", **sets})
    algo, data, _ = build_algorithm(keep)
    model, k = algo.setup.model, 3
    start = copy.deepcopy(model.state_dict())
    state = algo.initial_client_state(k)
    assert set(state) == {OPTIMIZER_STATE} and not state[OPTIMIZER_STATE].any()
    for t in range(3):
        algo.local_training(Client(k, t, data.client(k), state, client_generator(0, k, t)))
    kept = [p.detach().clone() for p in model.parameters()]

    model.load_state_dict(start)
    params = list(model.parameters())
    optimizer = reference(params)
    x, y = data.client(k).x_train, data.client(k).y_train
    for t in range(3):
        local_training(model, x, y, keep.train, client_generator(0, k, t), params=params, optimizer=optimizer)
    assert all(torch.equal(a, b) for a, b in zip(kept, model.parameters(), strict=True))

    reset, _, _ = build_algorithm(tiny_config(tmp_path / "r.h5", **sets))
    assert reset.initial_client_state(k) == {} and reset.state_specs() == [{}]
    reset.setup.model.load_state_dict(start)
    for t in range(3):
        reset.local_training(Client(k, t, data.client(k), {}, client_generator(0, k, t)))
    assert not all(torch.equal(a, b) for a, b in zip(kept, reset.setup.model.parameters(), strict=True))


def test_plain_sgd_keeps_nothing(tmp_path):
    algo, _, _ = build_algorithm(tiny_config(tmp_path / "x.h5", **{"train.optimizer_state": "keep"}))
    assert algo.state_specs() == [{}]


def _run(tmp_path, name, rounds, resume=False, **sets):
    overrides = {
        "name": name,
        "rounds": rounds,
        "algorithm.name": "fedper",
        "train.optimizer": "adam",
        "train.lr": 0.01,
        "train.local_epochs": 2,
        "state_every": 1,
        **sets,
    }
    cfg = tiny_config(tmp_path / f"{name}.h5", **overrides)
    assert Engine(cfg, SerialWorld(), resume=resume, show_progress=False).run() == 0
    return cfg.output_path


def test_kept_adam_state_resumes_exactly_and_differs_from_reset(tmp_path):
    straight = _run(tmp_path, "straight", 4, **{"train.optimizer_state": "keep"})
    _run(tmp_path, "resumed", 2, **{"train.optimizer_state": "keep"})
    resumed = _run(tmp_path, "resumed", 4, resume=True, **{"train.optimizer_state": "keep"})
    reset = _run(tmp_path, "reset", 4)
    a, b, c = (read_summary(p) for p in (straight, resumed, reset))
    assert b.rounds_completed == 4
    for metric in ("train_loss", "test_loss", "test_acc"):
        np.testing.assert_array_equal(b.rounds[metric], a.rounds[metric])
    assert not np.array_equal(c.rounds["train_loss"], a.rounds["train_loss"])
    assert np.array_equal(c.rounds["train_loss"][:1], a.rounds["train_loss"][:1])  # round 1: no state kept yet
    with h5py.File(straight, "r") as fa, h5py.File(resumed, "r") as fb:
        kept = fa["clients/state"][OPTIMIZER_STATE][-1]
        np.testing.assert_array_equal(fb["clients/state"][OPTIMIZER_STATE][-1], kept)
        for name in fa["clients/state"]:
            np.testing.assert_array_equal(fb["clients/state"][name][-1], fa["clients/state"][name][-1])
    assert np.abs(kept).sum() > 0  # the trained clients' moments are in the file
