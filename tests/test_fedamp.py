"""FedAMP: attention weights, cloud models, the proximal step, messages, a whole run, resume.

Expected values are computed here independently (numpy, float64, loops over pairs) from the paper's formulas.
"""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

from pfl_mpi.algorithms import Collected, Gathered, PerClient, resolve
from pfl_mpi.algorithms.base import Client, Setup
from pfl_mpi.algorithms.fedamp import FedAMP, FedAMPParams, attention_weights
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.data import ClientData, load_federated
from pfl_mpi.errors import ConfigError
from pfl_mpi.models import build_model
from pfl_mpi.runtime import Engine
from pfl_mpi.training.loop import TrainConfig, evaluate

from .helpers import tiny_config


def _algo(num_clients=5, lr=0.05, batch_size=32, **params) -> FedAMP:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    train = TrainConfig(lr=lr, batch_size=batch_size, local_epochs=1)
    setup = Setup(model, torch.device("cpu"), train, num_clients, 3, seed=0)
    return FedAMP(FedAMPParams.model_validate(params), setup)


def _xi_reference(w: np.ndarray, i: int, kind: str, alpha_k: float, sigma: float, xi_ii: float) -> np.ndarray:
    """Row i of the paper's attention matrix, one pair at a time."""
    n = w.shape[0]
    row = np.zeros(n)
    if kind == "fedamp":
        for j in range(n):
            if j != i:
                dist2 = float(np.sum((w[i] - w[j]) ** 2))
                row[j] = alpha_k * math.exp(-dist2 / sigma) / sigma  # alpha_k A'(d^2), A(x) = 1 - exp(-x/sigma)
        row[i] = 1 - row.sum()
    else:
        cos = [float(w[i] @ w[j] / (np.linalg.norm(w[i]) * np.linalg.norm(w[j]))) for j in range(n)]
        denom = sum(math.exp(sigma * cos[h]) for h in range(n) if h != i)
        for j in range(n):
            row[j] = xi_ii if j == i else (1 - xi_ii) * math.exp(sigma * cos[j]) / denom
    return row


# -- attention -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,sigma", [("fedamp", 4.0), ("heurfedamp", 5.0)])
def test_identical_clients_attend_to_each_other_more_than_to_a_dissimilar_one(kind, sigma):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(20, generator=g, dtype=torch.float64)
    other = torch.randn(20, generator=g, dtype=torch.float64)
    w = torch.stack([base, base.clone(), base + 0.3 * other, other])  # 0 and 1 identical, 3 unrelated
    xi = attention_weights(w, torch.arange(4), kind, alpha_k=0.5, sigma=sigma, xi_ii=0.4)
    assert xi[0, 1] > xi[0, 2] > xi[0, 3]
    assert xi[1, 0] > xi[1, 2] > xi[1, 3]
    assert xi[0, 1] == pytest.approx(xi[1, 0])  # symmetric data, symmetric attention
    for i in range(4):
        expected = _xi_reference(w.numpy(), i, kind, 0.5, sigma, 0.4)
        np.testing.assert_allclose(xi[i].numpy(), expected, rtol=1e-10, atol=1e-12)
    if kind == "fedamp":
        assert xi[0, 1] == pytest.approx(0.5 / sigma)  # A'(0) = 1 / sigma
    else:
        # the softmax ratio is exp(sigma (cos(w0, w1) - cos(w0, w3))), cos(w0, w1) = 1
        cos03 = float(base @ other / (base.norm() * other.norm()))
        assert float(xi[0, 1] / xi[0, 3]) == pytest.approx(math.exp(sigma * (1 - cos03)), rel=1e-9)


@pytest.mark.parametrize("kind", ["fedamp", "heurfedamp"])
def test_rows_sum_to_one_and_the_cloud_model_is_the_weighted_sum(kind):
    algo = _algo(num_clients=6, attention=kind, alpha_k=0.3, sigma=2.0, xi_ii=0.35)
    algo.init_server()
    g = torch.Generator().manual_seed(2)
    algo.w.copy_(algo.w + 0.5 * torch.randn(algo.w.shape, generator=g))
    clients = [4, 0, 3]
    xi = algo.attention(clients)
    np.testing.assert_allclose(xi.sum(dim=1).numpy(), 1.0, rtol=0, atol=1e-12)
    u = algo.downlink(0, clients, "train")
    assert u.shape == (3, algo.down_numel()) and u.dtype == torch.float32
    w = algo.w.double().numpy()
    for r, i in enumerate(clients):
        row = _xi_reference(w, i, kind, 0.3, 2.0, 0.35)
        np.testing.assert_allclose(xi[r].numpy(), row, rtol=1e-9, atol=1e-12)
        expected = sum(row[j] * w[j] for j in range(6))
        np.testing.assert_allclose(u[r].numpy(), expected, rtol=1e-5, atol=1e-6)
    if kind == "heurfedamp":
        np.testing.assert_allclose(xi[torch.arange(3), clients].numpy(), 0.35)


def test_every_client_starts_from_the_initial_model_and_the_server_tracks_uploads():
    algo = _algo(num_clients=4)
    algo.init_server()
    np.testing.assert_array_equal(algo.downlink(0, [0, 1, 2, 3], "train").numpy(), algo.initial.expand(4, -1).numpy())
    new = torch.randn(2, algo.up_numel())
    metrics = algo.aggregate(0, Collected([3, 1], new, torch.ones(2)))
    np.testing.assert_array_equal(algo.w[[3, 1]].numpy(), new.numpy())
    np.testing.assert_array_equal(algo.w[[0, 2]].numpy(), algo.initial.expand(2, -1).numpy())
    own = algo.attention([3, 1])[[0, 1], [3, 1]]
    assert metrics["xi_self_min"] == pytest.approx(float(own.min()))
    assert metrics["xi_self_mean"] == pytest.approx(float(own.mean()))


# -- the client --------------------------------------------------------------------------------


def _client(algo: FedAMP, state: torch.Tensor, n=24, seed=3) -> Client:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    data = ClientData(x, y, x[:6], y[:6])
    return Client(0, 0, data, {"model": state}, torch.Generator().manual_seed(seed))


def test_one_proximal_step_equals_the_hand_computed_step():
    """One full batch, one step: w1 = w0 - lr (grad CE(w0) + (lambda / alpha_k) (w0 - u))."""
    lam, alpha_k, lr = 0.8, 0.4, 0.1
    algo = _algo(lr=lr, batch_size=1000, **{"lambda": lam, "alpha_k": alpha_k})
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(algo.layout.numel, generator=g)
    u = torch.randn(algo.layout.numel, generator=g)
    client = _client(algo, w0.clone())
    x, y = client.data.x_train.double().numpy(), client.data.y_train.numpy()
    weight, bias = w0[:12].double().numpy().reshape(3, 4), w0[12:].double().numpy()
    logits = x @ weight.T + bias
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    grad = np.concatenate([(p.T @ x / len(y)).ravel(), p.mean(axis=0)])
    expected = w0.double().numpy() - lr * (grad + lam / alpha_k * (w0 - u).double().numpy())

    update = algo.client_update(client, u)
    np.testing.assert_allclose(update.payload.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(client.state["model"].numpy(), update.payload.numpy())  # w_i kept as state
    assert update.metrics["cloud_distance"] == pytest.approx(float((update.payload - u).norm()), rel=1e-6)


def test_a_larger_lambda_keeps_the_client_closer_to_its_cloud_model():
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(15, generator=g)
    u = w0 + torch.randn(15, generator=g)
    distances = []
    for lam in (0.0, 0.5, 2.0):
        algo = _algo(lr=0.05, batch_size=8, **{"lambda": lam, "alpha_k": 1.0})
        update = algo.client_update(_client(algo, w0.clone()), u)
        distances.append(update.metrics["cloud_distance"])
    assert distances[0] > distances[1] > distances[2]
    assert distances[2] < 0.8 * distances[0]


@pytest.mark.parametrize("start", ["personal", "cloud"])
def test_local_sgd_starts_from_the_chosen_model(start):
    algo = _algo(lr=1e-9, start=start)  # a negligible step: the result is the starting point
    g = torch.Generator().manual_seed(6)
    w0, u = torch.randn(15, generator=g), torch.randn(15, generator=g)
    update = algo.client_update(_client(algo, w0.clone()), u)
    np.testing.assert_allclose(update.payload.numpy(), (w0 if start == "personal" else u).numpy(), atol=1e-6)


def test_evaluation_uses_the_personal_model_and_leaves_the_state_alone():
    algo = _algo()
    w0 = torch.randn(15)
    client = _client(algo, w0.clone())
    algo.load_for_eval(client, torch.randn(15))
    np.testing.assert_array_equal(algo.layout.flatten(algo.setup.model).numpy(), w0.numpy())
    np.testing.assert_array_equal(client.state["model"].numpy(), w0.numpy())


# -- configuration, server state ---------------------------------------------------------------


def test_parameters_are_named_as_in_the_paper():
    cls, params = resolve({"name": "fedamp", "lambda": 0.25, "alpha_k": 2.0, "sigma": 3.0, "xi_ii": 0.2})
    assert cls is FedAMP and (params.lambda_, params.alpha_k, params.sigma, params.xi_ii) == (0.25, 2.0, 3.0, 0.2)
    with pytest.raises(ConfigError):
        resolve({"name": "fedamp", "mu": 1.0})
    with pytest.raises(ConfigError):
        resolve({"name": "fedamp", "xi_ii": 1.5})


def test_server_state_round_trips_exactly():
    a = _algo(num_clients=5, attention="fedamp", alpha_k=0.2, sigma=1.0)
    a.init_server()
    a.aggregate(0, Collected([2, 4], torch.randn(2, a.up_numel()), torch.ones(2)))
    saved = {k: torch.from_numpy(v.detach().numpy().copy()) for k, v in a.server_state().items()}  # as in the file
    b = _algo(num_clients=5, attention="fedamp", alpha_k=0.2, sigma=1.0)
    b.init_server()
    b.load_server_state(saved)
    np.testing.assert_array_equal(b.w.numpy(), a.w.numpy())
    np.testing.assert_array_equal(b.downlink(1, [0, 2, 3], "train").numpy(), a.downlink(1, [0, 2, 3], "train").numpy())
    np.testing.assert_array_equal(b.global_state()["attention"].numpy(), a.global_state()["attention"].numpy())


# -- whole runs --------------------------------------------------------------------------------


def test_runs_end_to_end_with_model_sized_messages_and_personal_models(tmp_path):
    cfg = tiny_config(tmp_path / "amp.h5", "fedamp", rounds=3, clients_per_round=6, state_every=1)
    engine = Engine(cfg, SerialWorld(), show_progress=False)
    assert engine.run() == 0
    algo = engine.algo
    numel = sum(p.numel() for p in algo.setup.model.parameters())
    assert isinstance(algo.down, PerClient) and isinstance(algo.up, Gathered)
    assert algo.down_numel() == algo.up_numel() == numel
    assert algo.client_state_spec(0) == {"model": numel}

    with h5py.File(cfg.output_path) as f:
        states = f["clients/state/model"][-1]  # [N, numel] after the last round
        test_acc = f["clients/test_acc"][-1]
        attention = f["global/state/attention"][-1]
        participated = f["clients/participated"][...].any(axis=0)
    # the server's W is every client's current personal model
    np.testing.assert_array_equal(algo.w.numpy(), states)
    assert participated.sum() >= 2
    trained = states[participated]
    assert np.linalg.norm(trained[:, None] - trained[None], axis=2).max() > 1e-3  # the models are personal
    np.testing.assert_allclose(attention.sum(axis=1), 1.0, atol=1e-5)
    # each client is evaluated with its own model
    data = load_federated(cfg.data, cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    for k in np.flatnonzero(participated)[:3]:
        torch.nn.utils.vector_to_parameters(torch.from_numpy(states[k]), model.parameters())
        client = data.client(int(k))
        assert evaluate(model, client.x_test, client.y_test)[1] == pytest.approx(test_acc[k], abs=1e-6)


def test_resume_equals_a_straight_run(tmp_path):
    sets = {"algorithm.attention": "fedamp", "algorithm.alpha_k": 0.1, "algorithm.sigma": 5.0}
    straight = tiny_config(tmp_path / "straight.h5", "fedamp", rounds=4, **sets)
    assert Engine(straight, SerialWorld(), show_progress=False).run() == 0
    first = tiny_config(tmp_path / "resumed.h5", "fedamp", rounds=2, **sets)
    assert Engine(first, SerialWorld(), show_progress=False).run() == 0
    rest = tiny_config(tmp_path / "resumed.h5", "fedamp", rounds=4, **sets)
    engine = Engine(rest, SerialWorld(), resume=True, show_progress=False)
    assert engine.start_round == 2 and engine.run() == 0
    with h5py.File(straight.output_path) as fa, h5py.File(rest.output_path) as fb:
        np.testing.assert_array_equal(fb["rounds/test_acc"][...], fa["rounds/test_acc"][...])
        np.testing.assert_array_equal(fb["clients/state/model"][-1], fa["clients/state/model"][-1])
        np.testing.assert_array_equal(fb["global/state/attention"][-1], fa["global/state/attention"][-1])


def test_without_the_proximal_term_every_client_trains_alone_like_local(tmp_path):
    """lambda = 0 and start = personal: u_i has no effect, so FedAMP's personal models are Local's, bit for bit."""
    amp = tiny_config(tmp_path / "amp.h5", "fedamp", rounds=2, **{"algorithm.lambda": 0})
    local = tiny_config(tmp_path / "local.h5", "local", rounds=2)
    for cfg in (amp, local):
        assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    with h5py.File(amp.output_path) as fa, h5py.File(local.output_path) as fb:
        np.testing.assert_array_equal(fa["clients/state/model"][-1], fb["clients/state/model"][-1])
        np.testing.assert_array_equal(fa["rounds/test_acc"][...], fb["rounds/test_acc"][...])
        assert np.isfinite(fa["clients/cloud_distance"][-1]).any()
