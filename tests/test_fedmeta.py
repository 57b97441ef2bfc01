"""FedMeta: MAML, FOMAML and Meta-SGD meta-gradients against independent autograd computations; the
server's step on the mean meta-gradient (Meta-SGD's alpha included); personalised evaluation."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pfl_mpi.algorithms import Client, Setup, WeightedMean
from pfl_mpi.algorithms.fedmeta import FedMeta, FedMetaParams
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.data import ClientData, load_federated
from pfl_mpi.models import build_model
from pfl_mpi.runtime import Engine
from pfl_mpi.store.nested import flatten_state, unflatten_state
from pfl_mpi.training.loop import TrainConfig

from .helpers import tiny_config


# -- a tiny smooth model, written out by hand for the independent computations --------------------
def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _loss(w, x, y) -> torch.Tensor:
    w1, b1, w2, b2 = w
    return F.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)


def _data(n: int = 10, seed: int = 1) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    return ClientData(x, y, x[:2].clone(), y[:2].clone())


def _algo(**params) -> FedMeta:
    setup = Setup(_net(), torch.device("cpu"), TrainConfig(), 2, 3, seed=0)
    return FedMeta(FedMetaParams(**params), setup)


def _client(data: ClientData, seed: int = 7, k: int = 0) -> Client:
    return Client(k, 0, data, {}, torch.Generator().manual_seed(seed))


def _split(n: int, fraction: float, seed: int = 7):
    """The documented split: a permutation from the client's generator, the first round(p n) are support."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = min(max(round(fraction * n), 1), n - 1)
    return order[:k], order[k:]


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _theta0() -> list[torch.Tensor]:
    return [p.detach().clone() for p in _net().parameters()]


def _maml_reference(data, alpha, steps, fraction, second_order, metasgd_alpha=None):
    """Meta-gradient by plain autograd on the hand-written network: (g_theta[, g_alpha]), query loss."""
    support, query = _split(len(data.y_train), fraction)
    x, y = data.x_train, data.y_train
    theta = [t.clone().requires_grad_(True) for t in _theta0()]
    lrs = [a.clone().requires_grad_(True) for a in metasgd_alpha] if metasgd_alpha is not None else None
    phi = theta
    for _ in range(steps):
        grads = torch.autograd.grad(_loss(phi, x[support], y[support]), phi, create_graph=second_order)
        if lrs is None:
            phi = [p - alpha * g for p, g in zip(phi, grads, strict=True)]
        else:
            phi = [p - a * g for p, a, g in zip(phi, lrs, grads, strict=True)]
        if not second_order:
            phi = [p.detach().requires_grad_(True) for p in phi]
    loss = _loss(phi, x[query], y[query])
    wrt = (theta if second_order else phi) + (lrs or [])
    return _flat(torch.autograd.grad(loss, wrt)), float(loss.detach())


# -- client meta-gradients --------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 2])
def test_maml_meta_gradient_is_the_second_order_gradient(steps):
    data, alpha, fraction = _data(), 0.5, 0.3
    update = _algo(variant="maml", alpha=alpha, inner_steps=steps, support_fraction=fraction).client_update(
        _client(data), _flat(_theta0())
    )
    second, loss = _maml_reference(data, alpha, steps, fraction, second_order=True)
    first, _ = _maml_reference(data, alpha, steps, fraction, second_order=False)
    torch.testing.assert_close(update.payload, second, rtol=1e-4, atol=1e-6)
    assert abs(update.metrics["train_loss"] - loss) < 1e-5
    assert (second - first).norm() > 1e-2 * second.norm()  # the second-order term matters here


def test_fomaml_meta_gradient_is_the_first_order_gradient():
    data, alpha, fraction = _data(), 0.5, 0.3
    for steps in (1, 2):
        algo = _algo(variant="fomaml", alpha=alpha, inner_steps=steps, support_fraction=fraction)
        update = algo.client_update(_client(data), _flat(_theta0()))
        first, _ = _maml_reference(data, alpha, steps, fraction, second_order=False)
        torch.testing.assert_close(update.payload, first, rtol=1e-4, atol=1e-6)


def test_metasgd_meta_gradient_covers_theta_and_alpha():
    data, fraction = _data(), 0.4
    lrs = [torch.full_like(t, 0.3) + 0.1 * torch.rand_like(t) for t in _theta0()]
    algo = _algo(variant="metasgd", support_fraction=fraction, inner_steps=2)
    assert algo.down_numel() == algo.up_numel() == 2 * sum(t.numel() for t in lrs)
    update = algo.client_update(_client(data), torch.cat([_flat(_theta0()), _flat(lrs)]))
    expected, _ = _maml_reference(data, None, 2, fraction, second_order=True, metasgd_alpha=lrs)
    torch.testing.assert_close(update.payload, expected, rtol=1e-4, atol=1e-6)


# -- the server -------------------------------------------------------------------------------
def test_metasgd_alpha_is_aggregated_and_stepped_by_the_server():
    alpha0, beta = 0.2, 0.05
    algo = _algo(variant="metasgd", alpha=alpha0, beta=beta, outer_optimizer="sgd")
    algo.init_server()
    d = algo.numel // 2
    x0 = algo.downlink(0, [0, 1], "train").clone()
    torch.testing.assert_close(x0[:d], _flat(_theta0()))
    assert torch.all(x0[d:] == alpha0)
    updates = [algo.client_update(_client(_data(seed=s), seed=s, k=s), x0) for s in (1, 2)]
    mean = (updates[0].payload + updates[1].payload) / 2  # uniform weights
    algo.aggregate(0, WeightedMean(mean, 2.0, 2))
    x1 = algo.downlink(1, [0, 1], "train")
    torch.testing.assert_close(x1[d:], alpha0 - beta * mean[d:])
    torch.testing.assert_close(x1[:d], x0[:d] - beta * mean[:d])
    assert (x1[d:] - alpha0).abs().max() > 1e-4  # the step sizes moved
    assert not torch.equal(updates[0].payload[d:], updates[1].payload[d:])


def test_metasgd_step_sizes_change_over_rounds_in_a_run(tmp_path):
    cfg = tiny_config(
        tmp_path / "m.h5",
        "fedmeta",
        rounds=3,
        state_every=1,
        **{"algorithm.variant": "metasgd", "algorithm.alpha": 0.1, "algorithm.beta": 0.01},
    )
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    with h5py.File(cfg.output_path) as f:
        alphas = f["global/state/alpha"][...]
        assert f["global/state/shared"].shape == alphas.shape
    assert alphas.shape[0] == 3
    steps = [np.abs(alphas[0] - 0.1).max(), *np.abs(np.diff(alphas, axis=0)).max(axis=1)]
    assert min(steps) > 1e-5  # every round moves them


def test_adam_steps_against_the_gradient_and_server_state_round_trips():
    algo = _algo(variant="maml", beta=0.01, outer_optimizer="adam")
    algo.init_server()
    x0 = algo.downlink(0, [0], "train").clone()
    sign = torch.arange(algo.numel) % 2 * 2.0 - 1.0
    g = sign * torch.linspace(0.1, 1, algo.numel)  # no zero entries
    algo.aggregate(0, WeightedMean(g, 1.0, 1))
    moved = algo.downlink(1, [0], "train") - x0
    assert torch.all(moved[g > 0] < 0) and torch.all(moved[g < 0] > 0)
    other = _algo(variant="maml", beta=0.01, outer_optimizer="adam")
    other.init_server()
    other.load_server_state(unflatten_state(flatten_state(algo.server_state())))  # as through the file
    for a in (algo, other):
        a.aggregate(1, WeightedMean(g.flip(0), 1.0, 1))
    torch.testing.assert_close(algo.downlink(2, [0], "train"), other.downlink(2, [0], "train"), rtol=0, atol=0)


# -- evaluation --------------------------------------------------------------------------------
def test_load_for_eval_adapts_on_the_training_split_and_keeps_the_payload():
    data, alpha = _data(), 0.5
    algo = _algo(variant="maml", alpha=alpha, inner_steps=2)
    payload = _flat(_theta0())
    before = payload.clone()
    algo.load_for_eval(_client(data), payload)
    w = _theta0()
    for _ in range(2):
        w = [t.requires_grad_(True) for t in w]
        grads = torch.autograd.grad(_loss(w, data.x_train, data.y_train), w)
        w = [(p - alpha * g).detach() for p, g in zip(w, grads, strict=True)]
    torch.testing.assert_close(_flat([p.detach() for p in algo.setup.model.parameters()]), _flat(w))
    assert torch.equal(payload, before)
    assert algo.client_state_spec(0) == {}


def test_personalised_accuracy_in_a_run_is_the_adapted_models_and_differs_from_the_global_models(tmp_path):
    alpha = 0.2
    cfg = tiny_config(
        tmp_path / "e.h5",
        "fedmeta",
        rounds=3,
        **{"algorithm.alpha": alpha, "algorithm.beta": 0.05, "algorithm.outer_optimizer": "adam"},
    )
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    with h5py.File(cfg.output_path) as f:
        theta = torch.from_numpy(f["global/state/shared"][-1])
        recorded = f["clients/test_acc"][-1]
    data = load_federated(cfg.data, cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    params = list(model.parameters())

    def accuracy(flat, client) -> float:
        torch.nn.utils.vector_to_parameters(flat, params)
        with torch.no_grad():
            return float((model(client.x_test).argmax(1) == client.y_test).float().mean())

    personal, global_ = [], []
    for k in range(data.num_clients):
        client = data.client(k)
        torch.nn.utils.vector_to_parameters(theta, params)
        grads = torch.autograd.grad(F.cross_entropy(model(client.x_train), client.y_train), params)
        personal.append(accuracy(theta - alpha * torch.cat([g.reshape(-1) for g in grads]), client))
        global_.append(accuracy(theta, client))
    np.testing.assert_allclose(recorded, personal, atol=1e-6)
    assert np.abs(np.array(personal) - np.array(global_)).max() > 0.05


def test_metasgd_with_adam_resumes_like_a_straight_run(tmp_path):
    sets = {"algorithm.variant": "metasgd", "algorithm.outer_optimizer": "adam", "algorithm.beta": 0.01}
    straight = tiny_config(tmp_path / "straight.h5", "fedmeta", rounds=4, **sets)
    assert Engine(straight, SerialWorld(), show_progress=False).run() == 0
    first = tiny_config(tmp_path / "resumed.h5", "fedmeta", rounds=2, **sets)
    assert Engine(first, SerialWorld(), show_progress=False).run() == 0
    rest = tiny_config(tmp_path / "resumed.h5", "fedmeta", rounds=4, **sets)
    engine = Engine(rest, SerialWorld(), resume=True, show_progress=False)
    assert engine.start_round == 2 and engine.run() == 0
    with h5py.File(straight.output_path) as fa, h5py.File(rest.output_path) as fb:
        np.testing.assert_array_equal(fb["rounds/test_acc"][...], fa["rounds/test_acc"][...])
        for name in ("shared", "alpha"):
            np.testing.assert_array_equal(fb["global/state"][name][-1], fa["global/state"][name][-1])
