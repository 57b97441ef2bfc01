"""Aggregation weights: each strategy gives the weight its definition says, and the aggregate uses it."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pfl_mpi.algorithms import Client, Setup, resolve
from pfl_mpi.algorithms.weighting import client_weight
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.data import ClientData, load_federated
from pfl_mpi.errors import ConfigError
from pfl_mpi.models import ModelConfig, build_model
from pfl_mpi.runtime import Engine
from pfl_mpi.runtime.placement import sample_clients
from pfl_mpi.seeding import client_generator
from pfl_mpi.training.loop import TrainConfig

from .helpers import flat, hand_sgd, initial_model, names_of, tiny_config

C = 4


def _setup(distribution) -> Setup:
    model = build_model(ModelConfig(name="logreg"), (3,), C)
    setup = Setup(model, torch.device("cpu"), TrainConfig(), num_clients=3, num_classes=C, seed=0)
    setup.label_distribution = torch.tensor(distribution, dtype=torch.float32)
    return setup


def _client(labels, seed=0) -> Client:
    y = torch.tensor(labels, dtype=torch.int64)
    x = torch.randn(len(y), 3, generator=torch.Generator().manual_seed(seed))
    return Client(0, 0, ClientData(x, y, x[:1], y[:1]), {}, torch.Generator())


def _kl_weight(labels, p) -> float:
    """n * exp(-KL(q || p)), written with numpy."""
    q = np.bincount(labels, minlength=C) / len(labels)
    s = q > 0
    return len(labels) * math.exp(-float(np.sum(q[s] * np.log(q[s] / np.asarray(p)[s]))))


def test_samples_and_uniform():
    client = _client([0, 1, 1, 3, 2])
    assert client_weight("samples", client) == 5.0
    assert client_weight("uniform", client) == 1.0


def test_label_kl_weight_follows_its_definition():
    p = [0.4, 0.3, 0.2, 0.1]
    setup = _setup(p)
    like_global = [0] * 4 + [1] * 3 + [2] * 2 + [3]  # histogram = p
    one_class = [2] * 10
    skewed = [0] * 7 + [3] * 3
    for labels in (like_global, one_class, skewed):
        assert client_weight("label_kl", _client(labels), setup) == pytest.approx(_kl_weight(labels, p), rel=1e-6)
    assert client_weight("label_kl", _client(like_global), setup) == pytest.approx(10.0, rel=1e-6)  # KL = 0
    assert client_weight("label_kl", _client(one_class), setup) == pytest.approx(10 * 0.2, rel=1e-6)  # n * p_c
    assert client_weight("label_kl", _client(like_global), setup) > client_weight("label_kl", _client(one_class), setup)
    with pytest.raises(ValueError, match="needs the Setup"):
        client_weight("label_kl", _client(one_class))


def test_quality_weight_follows_its_definition():
    setup = _setup([0.25] * C)
    labels = [0, 1, 2, 3, 1, 1, 0]
    client = _client(labels, seed=4)
    x, y = client.train
    with torch.no_grad():
        logits = setup.model(x)
        mean_nll = float(-(logits - logits.exp().sum(1, keepdim=True).log())[torch.arange(len(y)), y].mean())
    assert client_weight("quality", client, setup) == pytest.approx(len(labels) * math.exp(-mean_nll), rel=1e-5)

    # a model that fits the client's labels better gets a larger weight
    before = client_weight("quality", client, setup)
    weight, bias = setup.model.head.fc1.weight, setup.model.head.fc1.bias
    for _ in range(50):
        loss = F.cross_entropy(setup.model(x), y)
        gw, gb = torch.autograd.grad(loss, [weight, bias])
        with torch.no_grad():
            weight -= 0.5 * gw
            bias -= 0.5 * gb
    assert client_weight("quality", client, setup) > before
    assert client_weight("quality", client, setup) < len(labels)


def test_unknown_strategy_is_a_config_error():
    with pytest.raises(ConfigError, match="algorithm.weighting"):
        resolve({"name": "fedavg", "weighting": "bogus"})
    for name in ("samples", "uniform", "quality", "label_kl"):
        for algorithm in ("fedavg", "lgfedavg", "fedrep"):
            assert resolve({"name": algorithm, "weighting": name})[1].weighting == name


@pytest.mark.parametrize("weighting", ["samples", "uniform"])
def test_uniform_and_samples_give_their_own_aggregates(tmp_path, weighting):
    """FedAvg, one round, on clients of very unequal sizes: the global model is the weighted mean by hand."""
    overrides = {
        "data.partition": "quantity",
        "data.quantity_sigma": 1.5,
        "rounds": 1,
        "algorithm.weighting": weighting,
    }
    cfg = tiny_config(tmp_path / f"{weighting}.h5", "fedavg", **overrides)
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    data = load_federated(cfg.data, cfg.seed)
    sampled = [int(k) for k in sample_clients(cfg.seed, 0, data.num_clients, cfg.sampled_per_round)]
    sizes = np.array([len(data.client(k).y_train) for k in sampled], dtype=np.float64)
    assert sizes.max() > 2 * sizes.min()

    model = initial_model(cfg, data)
    names = [n for n, _ in model.named_parameters()]
    models = []
    for k in sampled:
        local = initial_model(cfg, data)
        c = data.client(k)
        hand_sgd(
            local, names, c.x_train, c.y_train, cfg.train.lr, cfg.train.batch_size, client_generator(cfg.seed, k, 0), 1
        )
        models.append(flat(local, names))
    stacked = torch.stack(models)
    by_samples = (torch.from_numpy(sizes).float()[:, None] * stacked).sum(0) / float(sizes.sum())
    by_clients = stacked.mean(0)
    expected, other = (by_samples, by_clients) if weighting == "samples" else (by_clients, by_samples)
    with h5py.File(cfg.output_path) as f:
        stored = torch.from_numpy(f["global/state/shared"][-1])
    torch.testing.assert_close(stored, expected, rtol=1e-4, atol=1e-5)
    assert (stored - other).abs().max() > 1e-3  # the other strategy would have given another model


@pytest.mark.parametrize("weighting", ["quality", "label_kl"])
def test_client_side_strategies_weight_the_aggregate(tmp_path, weighting):
    """FedRep (which passes the Setup) on label-skewed clients: its body average uses the weights by hand."""
    overrides = {
        "data.partition": "dirichlet",
        "data.dirichlet_alpha": 0.3,
        "rounds": 1,
        "algorithm.weighting": weighting,
        "algorithm.tau_h": 2,
        "algorithm.tau_b": 1,
    }
    cfg = tiny_config(tmp_path / f"{weighting}.h5", "fedrep", **overrides)
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    data = load_federated(cfg.data, cfg.seed)
    counts = sum(np.bincount(data.client(k).y_train.numpy(), minlength=10) for k in range(data.num_clients))
    p = counts / counts.sum()
    model = initial_model(cfg, data)
    body, head = names_of(model, "base."), names_of(model, "head.")

    bodies, weights = [], []
    for k in (int(k) for k in sample_clients(cfg.seed, 0, data.num_clients, cfg.sampled_per_round)):
        local, c = initial_model(cfg, data), data.client(k)
        generator = client_generator(cfg.seed, k, 0)
        hand_sgd(local, head, c.x_train, c.y_train, cfg.train.lr, cfg.train.batch_size, generator, 2)
        hand_sgd(local, body, c.x_train, c.y_train, cfg.train.lr, cfg.train.batch_size, generator, 1)
        bodies.append(flat(local, body))
        y = c.y_train.numpy()
        if weighting == "label_kl":
            q = np.bincount(y, minlength=10) / len(y)
            s = q > 0
            weights.append(len(y) * math.exp(-float(np.sum(q[s] * np.log(q[s] / p[s])))))
        else:
            with torch.no_grad():
                weights.append(len(y) * math.exp(-float(F.cross_entropy(local(c.x_train), c.y_train))))
    w = torch.tensor(weights, dtype=torch.float32)
    assert float(w.max() / w.min()) > 1.2  # the strategy does tell these clients apart
    with h5py.File(cfg.output_path) as f:
        stored = torch.from_numpy(f["global/state/shared"][-1])
    bodies = torch.stack(bodies)
    torch.testing.assert_close(stored, (w[:, None] * bodies).sum(0) / w.sum(), rtol=1e-4, atol=1e-5)
    assert (stored - bodies.mean(0)).abs().max() > 1e-4  # not the uniform mean
