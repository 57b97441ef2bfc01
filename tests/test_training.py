"""The library's client loop: optimisers, clipping and schedules against torch's own, and the train keys an
algorithm refuses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pfl_mpi.algorithms import Client
from pfl_mpi.config import load_config
from pfl_mpi.data import load_federated
from pfl_mpi.errors import ConfigError
from pfl_mpi.runtime.build import check_buildable
from pfl_mpi.seeding import client_generator
from pfl_mpi.training.loop import (
    Batch,
    ScheduleConfig,
    TrainConfig,
    local_training,
    lr_factor,
    make_optimizer,
)

from .helpers import build_algorithm, tiny_config


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)), x, y


def _torch_reference(model, x, y, cfg: TrainConfig, seed: int, make) -> list[torch.Tensor]:
    """The same batches (one permutation per epoch from the generator) with a torch.optim optimiser."""
    opt, generator = make(model.parameters()), torch.Generator().manual_seed(seed)
    for _ in range(cfg.local_epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            if cfg.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


CASES = {
    "sgd-momentum-wd": (
        {"momentum": 0.9, "weight_decay": 0.01},
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    ),
    "sgd-nesterov": (
        {"momentum": 0.9, "nesterov": True},
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    ),
    "sgd-clipped": ({"clip_norm": 0.05}, lambda ps: torch.optim.SGD(ps, lr=0.1)),
    "adam": ({"optimizer": "adam", "weight_decay": 0.01}, lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.01)),
    "adamw": (
        {"optimizer": "adamw", "weight_decay": 0.1, "betas": (0.8, 0.99)},
        lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1, betas=(0.8, 0.99)),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_the_loop_steps_as_torch_optim_does(case):
    options, make = CASES[case]
    cfg = TrainConfig(lr=0.1, batch_size=8, local_epochs=3, **options)
    model, x, y = _problem()
    reference = _torch_reference(_problem()[0], x, y, cfg, seed=7, make=make)
    params = list(model.parameters())
    optimizer = make_optimizer(params, cfg)
    means = local_training(model, x, y, cfg, torch.Generator().manual_seed(7), optimizer=optimizer)
    assert means["train_loss"] > 0
    for mine, theirs in zip(params, reference, strict=True):
        torch.testing.assert_close(mine.detach(), theirs, rtol=1e-5, atol=1e-6)


def test_a_loss_function_sees_its_batches_and_reports_means():
    model, x, y = _problem()
    seen = []

    def loss(model, batch: Batch):
        seen.append((batch.epoch, batch.idx.clone()))
        value = F.cross_entropy(model(batch.x), batch.y)
        return value, {"train_loss": value, "batch": torch.tensor(float(len(batch.idx)))}

    cfg = TrainConfig(batch_size=16, local_epochs=2)
    means = local_training(model, x, y, cfg, torch.Generator().manual_seed(0), loss=loss)
    assert [e for e, _ in seen] == [0, 0, 0, 1, 1, 1]  # 40 samples: 16 + 16 + 8, twice
    assert sorted(torch.cat([i for e, i in seen if e == 0]).tolist()) == list(range(40))
    assert means["batch"] == pytest.approx((16 + 16 + 8) / 3)
    assert means["not reported"] == 0.0


@pytest.mark.parametrize(
    "schedule,t,expected",
    [
        ({"name": "constant"}, 7, 1.0),
        ({"name": "step", "step_size": 3, "gamma": 0.5}, 7, 0.25),
        ({"name": "exponential", "gamma": 0.9}, 4, 0.9**4),
        ({"name": "cosine"}, 5, 0.5),  # half of a 10-round run
        ({"name": "cosine", "period": 4, "min_factor": 0.2}, 9, 0.2),  # after the period: the floor
        ({"name": "cosine", "period": 8}, 2, 0.5 * (1 + math.cos(math.pi / 4))),
    ],
)
def test_schedules(schedule, t, expected):
    assert lr_factor(ScheduleConfig(**schedule), t, rounds=10) == pytest.approx(expected, rel=1e-12)


def test_the_client_schedule_scales_the_rounds_learning_rate(tmp_path):
    """Round t's SGD step is the round-0 step with lr * gamma^t: one full-batch step from the same model."""
    sets = {"train.batch_size": 1000, "train.schedule.name": "exponential", "train.schedule.gamma": 0.5}
    algo, data, w0 = build_algorithm(tiny_config(tmp_path / "x.h5", "fedavg", **sets))
    deltas = []
    for t in (0, 3):
        client = Client(2, t, data.client(2), {}, client_generator(0, 2, t))
        deltas.append(algo.client_update(client, w0.clone()).payload)
    torch.testing.assert_close(deltas[1], deltas[0] * 0.5**3, rtol=1e-4, atol=1e-7)


def test_the_server_schedule_scales_the_server_step():
    from pfl_mpi.algorithms.server_opt import ServerOptConfig, ServerOptimizer

    cfg = ServerOptConfig(lr=1.0, schedule=ScheduleConfig(name="step", step_size=2, gamma=0.1))
    opt, w, update = ServerOptimizer(cfg, 3), torch.zeros(3), torch.ones(3)
    moves = []
    for _ in range(4):
        before = w.clone()
        opt.step(w, update)
        moves.append(float((w - before)[0]))
    assert moves == pytest.approx([1.0, 1.0, 0.1, 0.1])


@pytest.mark.parametrize(
    "algorithm,key,applies",
    [
        ("pfedhn", "lr", "algorithm.inner_lr"),
        ("perfedavg", "local_epochs", "algorithm.tau"),
        ("fedmeta", "lr", "algorithm.alpha"),
        ("fedrep", "local_epochs", "algorithm.tau_h"),
    ],
)
def test_a_train_key_the_algorithm_does_not_use_is_refused(algorithm, key, applies):
    value = {"lr": 0.3, "local_epochs": 4}[key]
    cfg = load_config(None, [f"algorithm.name={algorithm}", f"train.{key}={value}", "data.num_clients=10"])
    with pytest.raises(ConfigError, match=f"train.{key}") as err:
        check_buildable(cfg, load_federated(cfg.data, cfg.seed))
    assert applies in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "sets,key",
    [
        (["train.nesterov=true"], "nesterov"),
        (["train.optimizer=adam", "train.momentum=0.9"], "momentum"),
        (["train.optimizer=rmsprop"], "train.optimizer"),
        (["train.clip_norm=0"], "train.clip_norm"),
        (["train.schedule.name=cosine", "train.schedule.period=0"], "train.schedule.period"),
    ],
)
def test_bad_optimiser_keys_are_one_line_errors(sets, key):
    with pytest.raises(ConfigError, match=key) as err:
        load_config(None, sets)
    assert "\n" not in str(err.value)


def test_the_loop_augments_each_training_batch_from_the_clients_generator(tmp_path):
    """``Setup.augment`` (``data.augment``) transforms every training batch, drawing from the client's generator:
    a flip drawn there changes the update, and the same draw on another rank count would give the same one."""
    algo, data, w0 = build_algorithm(tiny_config(tmp_path / "x.h5", "fedavg"))
    client = data.client(3)
    calls = []

    def flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        calls.append((x.shape[0], generator))
        return -x if torch.rand((), generator=generator) < 0.5 else x

    plain = algo.client_update(Client(3, 0, client, {}, client_generator(0, 3, 0)), w0.clone()).payload
    algo.setup.augment = flip
    generator = client_generator(0, 3, 0)
    augmented = algo.client_update(Client(3, 0, client, {}, generator), w0.clone()).payload
    batches = math.ceil(client.y_train.shape[0] / 8)
    assert [n for n, _ in calls] == [8] * (batches - 1) + [client.y_train.shape[0] - 8 * (batches - 1)]
    assert all(g is generator for _, g in calls)
    assert not torch.equal(plain, augmented)
    again = algo.client_update(Client(3, 0, client, {}, client_generator(0, 3, 0)), w0.clone()).payload
    assert torch.equal(again, augmented)  # a function of (seed, client, round)


def test_fine_tuning_uses_the_train_section_so_its_keys_are_accepted_then():
    """With finetune_epochs > 0 every client fine-tunes with the train section's optimiser: pFedHN then accepts
    train.lr (used by fine-tuning) but still refuses train.local_epochs (fine-tuning runs finetune_epochs)."""
    sets = ["algorithm.name=pfedhn", "data.num_clients=10", "finetune_epochs=2"]
    cfg = load_config(None, [*sets, "train.lr=0.3"])
    check_buildable(cfg, load_federated(cfg.data, cfg.seed))
    cfg = load_config(None, [*sets, "train.local_epochs=3"])
    with pytest.raises(ConfigError, match="train.local_epochs: pfedhn does not use train.local_epochs"):
        check_buildable(cfg, load_federated(cfg.data, cfg.seed))
