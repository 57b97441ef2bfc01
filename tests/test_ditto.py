"""Ditto: the global model is FedAvg's, v_k is personal, pulled towards w_t by lam, and is what is evaluated."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pfl_mpi.algorithms import Broadcast, Client, WeightedSum
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.data import load_federated
from pfl_mpi.models import build_model
from pfl_mpi.runtime import Engine
from pfl_mpi.runtime.placement import sample_clients
from pfl_mpi.seeding import client_generator
from pfl_mpi.store import read_summary
from pfl_mpi.training.loop import evaluate

from .helpers import build_algorithm, committed, tiny_config


def _run(path, algorithm="ditto", resume=False, **overrides):
    cfg = tiny_config(path, algorithm, **overrides)
    assert Engine(cfg, SerialWorld(), resume=resume, show_progress=False).run() == 0
    return cfg


def _client(cfg, data, state, k: int, t: int) -> Client:
    return Client(k, t, data.client(k), state, client_generator(cfg.seed, k, t))


def test_global_model_is_fedavg_exactly(tmp_path):
    options = {"train.local_epochs": 2}
    ditto = _run(tmp_path / "ditto.h5", **options, **{"algorithm.lam": 1.0})
    avg = _run(tmp_path / "avg.h5", "fedavg", **options)
    for name in ("train_loss", "update_norm"):
        np.testing.assert_array_equal(
            committed(ditto.output_path, "rounds", name), committed(avg.output_path, "rounds", name)
        )
    np.testing.assert_array_equal(
        committed(ditto.output_path, "clients", "train_loss"), committed(avg.output_path, "clients", "train_loss")
    )
    with h5py.File(ditto.output_path) as f, h5py.File(avg.output_path) as g:
        np.testing.assert_array_equal(f["global/state/shared"][...], g["global/state/shared"][...])
        np.testing.assert_array_equal(f["checkpoint/slot0/server/w"][...], g["checkpoint/slot0/server/w"][...])
    # ... but what is evaluated is each client's v_k, not w
    gap = committed(ditto.output_path, "rounds", "test_acc") - committed(avg.output_path, "rounds", "test_acc")
    assert np.abs(gap).max() > 0.05


def test_lam_zero_makes_v_plain_local_training(tmp_path):
    ditto = _run(tmp_path / "ditto.h5", **{"algorithm.lam": 0.0, "train.local_epochs": 2})
    local = _run(tmp_path / "local.h5", "local", **{"train.local_epochs": 2})
    with h5py.File(ditto.output_path) as f, h5py.File(local.output_path) as g:
        v, alone = f["clients/state/v"][...], g["clients/state/model"][...]
        np.testing.assert_array_equal(f["clients/state/round"][...], g["clients/state/round"][...])
    assert v.shape == alone.shape
    np.testing.assert_array_equal(v, alone)
    for name in ("test_acc", "test_loss"):
        np.testing.assert_array_equal(
            committed(ditto.output_path, "rounds", name), committed(local.output_path, "rounds", name)
        )
    np.testing.assert_array_equal(
        committed(ditto.output_path, "clients", "personal_train_loss"),
        committed(local.output_path, "clients", "train_loss"),
    )


def test_v_moves_towards_w_as_lam_grows(tmp_path):
    cfg = tiny_config(tmp_path / "x.h5", "ditto", **{"train.local_epochs": 2})
    distances, payloads = [], []
    for lam in (0.0, 0.1, 0.5, 2.0):
        algo, data, w = build_algorithm(cfg, lam=lam)
        state = algo.init_client_state(4)
        for t in range(3):  # the same client, three rounds against the same w
            update = algo.client_update(_client(cfg, data, state, 4, t), w)
        distances.append(float((state["v"] - w).norm()))
        payloads.append(update.payload)
    assert distances[0] > 1.0
    assert all(a > b for a, b in zip(distances[:-1], distances[1:], strict=True)), distances
    assert distances[-1] < 0.5 * distances[0], distances
    for p in payloads[1:]:  # lam changes v only: the global update is the same
        torch.testing.assert_close(p, payloads[0], rtol=0, atol=0)


def test_personal_update_is_sgd_on_the_regularised_objective(tmp_path):
    cfg = tiny_config(tmp_path / "x.h5", "ditto", **{"train.local_epochs": 2})
    lam, k, t = 0.7, 2, 5
    algo, data, w = build_algorithm(cfg, lam=lam)
    v0 = w + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    state = {"v": v0.clone()}
    update = algo.client_update(_client(cfg, data, state, k, t), w)
    assert update.payload.shape == w.shape
    assert np.isfinite(update.metrics["personal_train_loss"])

    # v <- v - lr (grad F_k(v) + lam (v - w_t)), on the batches of the client's stream, written out
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    with torch.no_grad():
        for p, a in zip(params, v0.split(sizes), strict=True):
            p.copy_(a.view(p.shape))
    anchors = [a.view(p.shape) for p, a in zip(params, w.split(sizes), strict=True)]
    d, generator = data.client(k), client_generator(cfg.seed, k, t)
    for _ in range(cfg.train.local_epochs):
        order = torch.randperm(len(d.y_train), generator=generator)
        for start in range(0, len(order), cfg.train.batch_size):
            idx = order[start : start + cfg.train.batch_size]
            grads = torch.autograd.grad(F.cross_entropy(model(d.x_train[idx]), d.y_train[idx]), params)
            with torch.no_grad():
                for p, g, a in zip(params, grads, anchors, strict=True):
                    p -= cfg.train.lr * (g + lam * (p - a))
    expected = torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close(state["v"], expected, rtol=0, atol=2e-6)


def test_only_w_is_communicated(tmp_path):
    cfg = tiny_config(tmp_path / "x.h5", "ditto")
    algo, data, w = build_algorithm(cfg)
    avg, _, w_avg = build_algorithm(tiny_config(tmp_path / "y.h5", "fedavg"))
    numel = sum(p.numel() for p in algo.setup.model.parameters())
    assert isinstance(algo.down, Broadcast) and isinstance(algo.up, WeightedSum)
    assert algo.down_numel() == algo.up_numel() == numel == w.numel()
    assert algo.client_state_spec(0) == {"v": numel}
    torch.testing.assert_close(w, w_avg, rtol=0, atol=0)

    # what goes up is FedAvg's update, whatever v_k holds: v never enters a message
    expected = avg.client_update(_client(cfg, data, {}, 1, 0), w_avg).payload
    for v in (algo.init_client_state(1)["v"], torch.full((numel,), 3.0)):
        state = {"v": v.clone()}
        update = algo.client_update(_client(cfg, data, state, 1, 0), w)
        torch.testing.assert_close(update.payload, expected, rtol=0, atol=0)
        assert not torch.allclose(state["v"], w + update.payload)  # v_k is a model of its own


def test_evaluation_uses_v_and_leaves_it_alone(tmp_path):
    cfg = _run(tmp_path / "ditto.h5")
    data = load_federated(cfg.data, cfg.seed)
    with h5py.File(cfg.output_path) as f:
        v = f["clients/state/v"][-1]
        w = f["global/state/shared"][-1]
    acc = committed(cfg.output_path, "clients", "test_acc")[-1]
    algo, _, _ = build_algorithm(cfg)
    model = algo.setup.model
    for k in range(cfg.data.num_clients):
        state = {"v": torch.from_numpy(v[k].copy())}
        algo.load_for_eval(_client(cfg, data, state, k, cfg.rounds - 1), torch.from_numpy(w))
        d = data.client(k)
        assert evaluate(model, d.x_test, d.y_test)[1] == pytest.approx(acc[k], abs=1e-9)
        np.testing.assert_array_equal(state["v"].numpy(), v[k])
    # clients never sampled still hold v_0 = w_0; those sampled hold models of their own
    sampled = np.unique(np.concatenate([sample_clients(cfg.seed, t, 10, cfg.clients_per_round) for t in range(3)]))
    _, _, w0 = build_algorithm(cfg)
    for k in range(cfg.data.num_clients):
        assert np.array_equal(v[k], w0.numpy()) == (k not in sampled)


def test_resume_restores_v_exactly(tmp_path):
    straight = _run(tmp_path / "straight.h5", rounds=4)
    _run(tmp_path / "resumed.h5", rounds=2)
    resumed = _run(tmp_path / "resumed.h5", resume=True, rounds=4)
    assert read_summary(resumed.output_path).rounds_completed == 4
    for name in ("train_loss", "test_acc"):
        np.testing.assert_array_equal(
            committed(resumed.output_path, "rounds", name), committed(straight.output_path, "rounds", name)
        )
    with h5py.File(straight.output_path) as f, h5py.File(resumed.output_path) as g:
        np.testing.assert_array_equal(f["clients/state/v"][-1], g["clients/state/v"][-1])
        np.testing.assert_array_equal(f["global/state/shared"][-1], g["global/state/shared"][-1])
