"""FedProx: the proximal term, stragglers kept or dropped; checked against FedAvg and hand-written SGD."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pfl_mpi.algorithms import Client
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.data import load_federated
from pfl_mpi.models import build_model
from pfl_mpi.runtime import Engine
from pfl_mpi.runtime.placement import sample_clients
from pfl_mpi.seeding import client_generator

from .helpers import build_algorithm, committed, last_global_state, tiny_config


def _run(path, algorithm="fedprox", **overrides):
    cfg = tiny_config(path, algorithm, **overrides)
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    return cfg


def _client(cfg, data, algo, k: int, t: int) -> Client:
    return Client(k, t, data.client(k), algo.init_client_state(k), client_generator(cfg.seed, k, t))


def _prox_sgd(cfg, model, w_t: torch.Tensor, k: int, t: int, data, mu: float, epochs: int) -> torch.Tensor:
    """Client k's model after ``epochs`` of minibatch SGD on CE + (mu/2)||w - w_t||^2 from w_t, written out."""
    params = list(model.parameters())
    anchors = [a.view(p.shape).clone() for p, a in zip(params, w_t.split([p.numel() for p in params]), strict=True)]
    with torch.no_grad():
        for p, a in zip(params, anchors, strict=True):
            p.copy_(a)
    d, generator, tc = data.client(k), client_generator(cfg.seed, k, t), cfg.train
    for _ in range(epochs):
        order = torch.randperm(len(d.y_train), generator=generator)
        for start in range(0, len(order), tc.batch_size):
            idx = order[start : start + tc.batch_size]
            grads = torch.autograd.grad(F.cross_entropy(model(d.x_train[idx]), d.y_train[idx]), params)
            with torch.no_grad():
                for p, g, a in zip(params, grads, anchors, strict=True):
                    p -= tc.lr * (g + mu * (p - a))
    return torch.cat([p.detach().reshape(-1) for p in params])


def test_mu_zero_without_stragglers_is_fedavg_exactly(tmp_path):
    options = {"train.local_epochs": 2}
    prox = _run(tmp_path / "prox.h5", **options, **{"algorithm.mu": 0.0})
    avg = _run(tmp_path / "avg.h5", "fedavg", **options)
    for name in ("train_loss", "test_loss", "test_acc", "update_norm"):
        np.testing.assert_array_equal(
            committed(prox.output_path, "rounds", name), committed(avg.output_path, "rounds", name)
        )
    for name in ("train_loss", "test_acc", "participated"):
        np.testing.assert_array_equal(
            committed(prox.output_path, "clients", name), committed(avg.output_path, "clients", name)
        )
    with h5py.File(prox.output_path) as f, h5py.File(avg.output_path) as g:
        np.testing.assert_array_equal(f["global/state/shared"][...], g["global/state/shared"][...])
        for slot in ("slot0", "slot1"):
            np.testing.assert_array_equal(f[f"checkpoint/{slot}/server/w"][...], g[f"checkpoint/{slot}/server/w"][...])
    epochs = committed(prox.output_path, "clients", "local_epochs")
    participated = committed(prox.output_path, "clients", "participated").astype(bool)
    assert np.all(epochs[participated] == 2) and np.all(np.isnan(epochs[~participated]))


def test_proximal_term_keeps_the_local_model_closer_to_w_t(tmp_path):
    cfg = tiny_config(tmp_path / "x.h5", "fedprox", **{"train.local_epochs": 4})
    distances = []
    for mu in (0.0, 0.1, 1.0, 5.0):
        algo, data, w0 = build_algorithm(cfg, mu=mu)
        update = algo.client_update(_client(cfg, data, algo, 3, 0), w0)
        distances.append(float(update.payload.norm()))  # ||w_k - w_t||
        assert update.metrics["local_epochs"] == 4 and update.metrics["straggler"] == 0
        # the update is that of SGD on the proximal objective, written out independently
        expected = _prox_sgd(cfg, build_model(cfg.model, data.input_shape, data.num_classes), w0, 3, 0, data, mu, 4)
        torch.testing.assert_close(w0 + update.payload, expected, rtol=0, atol=2e-6)
    assert distances[0] > 0.5  # the client does move without the term
    assert all(a > b for a, b in zip(distances[:-1], distances[1:], strict=True)), distances
    assert distances[-1] < 0.5 * distances[0], distances


def _straggler_runs(tmp_path):
    options = {
        "rounds": 1,
        "train.local_epochs": 3,
        "algorithm.mu": 0.5,
        "algorithm.straggler_fraction": 0.5,
    }
    keep = _run(tmp_path / "keep.h5", **options)
    drop = _run(tmp_path / "drop.h5", **options, **{"algorithm.drop_stragglers": True})
    return keep, drop


def test_dropped_stragglers_contribute_nothing_and_kept_ones_do(tmp_path):
    keep, drop = _straggler_runs(tmp_path)
    cfg = keep
    sampled = sample_clients(cfg.seed, 0, cfg.data.num_clients, cfg.sampled_per_round)
    straggler = committed(keep.output_path, "clients", "straggler")[0]
    np.testing.assert_array_equal(straggler, committed(drop.output_path, "clients", "straggler")[0])
    assert np.all(np.isnan(np.delete(straggler, sampled)))
    slow = [int(k) for k in sampled if straggler[k] == 1]
    fast = [int(k) for k in sampled if straggler[k] == 0]
    assert slow and fast, "the seed must give both stragglers and others in the round"

    kept_epochs = committed(keep.output_path, "clients", "local_epochs")[0]
    dropped_epochs = committed(drop.output_path, "clients", "local_epochs")[0]
    assert np.all(kept_epochs[fast] == 3) and np.all(dropped_epochs[fast] == 3)
    assert np.all((kept_epochs[slow] >= 1) & (kept_epochs[slow] <= 2))  # fewer epochs: 1..E-1
    assert np.all(dropped_epochs[slow] == 0)

    data = load_federated(cfg.data, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    w0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    trained = {k: _prox_sgd(cfg, model, w0, k, 0, data, 0.5, int(kept_epochs[k])) for k in sampled}
    size = {k: float(len(data.client(k).y_train)) for k in sampled}

    def mean(clients):
        return sum(size[k] * trained[k] for k in clients) / sum(size[k] for k in clients)

    dropped_w, kept_w = last_global_state(drop.output_path), last_global_state(keep.output_path)
    np.testing.assert_allclose(dropped_w, mean(fast).numpy(), rtol=0, atol=2e-6)  # the non-stragglers only
    np.testing.assert_allclose(kept_w, mean(fast + slow).numpy(), rtol=0, atol=2e-6)  # partial work included
    assert np.abs(kept_w - dropped_w).max() > 1e-3


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the runtime's 0/0 mean
def test_a_round_where_every_client_is_dropped_keeps_w(tmp_path):
    cfg = _run(
        tmp_path / "all.h5",
        rounds=2,
        **{"algorithm.straggler_fraction": 1.0, "algorithm.drop_stragglers": True},
    )
    _, _, w0 = build_algorithm(cfg)
    with h5py.File(cfg.output_path) as f:
        np.testing.assert_array_equal(f["global/state/shared"][-1], w0.numpy())
    np.testing.assert_array_equal(committed(cfg.output_path, "rounds", "update_norm"), [0.0, 0.0])
    epochs = committed(cfg.output_path, "clients", "local_epochs")
    assert np.all(epochs[np.isfinite(epochs)] == 0)
    assert np.all(np.isfinite(committed(cfg.output_path, "rounds", "train_loss")))


def test_straggler_draws_follow_the_fraction_and_depend_on_seed_client_round(tmp_path):
    cfg = tiny_config(tmp_path / "x.h5", "fedprox", **{"train.local_epochs": 4})
    algo, data, _ = build_algorithm(cfg, straggler_fraction=0.3)
    d = data.client(0)

    def draws(algorithm):
        return [
            algorithm.straggler_epochs(Client(k, t, d, {}, torch.Generator())) for t in range(200) for k in range(10)
        ]

    first = draws(algo)
    assert first == draws(algo)  # a function of (seed, client, round): the same on any rank, any time
    slow = [e for e in first if e is not None]
    assert abs(len(slow) / len(first) - 0.3) < 0.04
    counts = np.bincount(slow, minlength=5)
    assert counts[0] == 0 and counts[4] == 0  # 1..E-1 epochs, never E
    np.testing.assert_allclose(counts[1:4] / len(slow), 1 / 3, atol=0.06)
    other_seed, _, _ = build_algorithm(tiny_config(tmp_path / "y.h5", "fedprox", seed=1), straggler_fraction=0.3)
    assert draws(other_seed) != first
    none, _, _ = build_algorithm(cfg, straggler_fraction=0.0)
    assert all(e is None for e in draws(none))
