"""Per-FedAvg: the FO and HF local steps against hand computations, personalised evaluation, aggregation."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pfl_mpi.algorithms import Client, Setup, WeightedMean
from pfl_mpi.algorithms.meta import FunctionalModel, hvp_exact, hvp_finite_difference
from pfl_mpi.algorithms.perfedavg import PerFedAvg, PerFedAvgParams
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.data import ClientData, load_federated
from pfl_mpi.models import build_model
from pfl_mpi.runtime import Engine
from pfl_mpi.runtime.placement import sample_clients
from pfl_mpi.seeding import client_generator
from pfl_mpi.store.nested import flatten_state, unflatten_state
from pfl_mpi.training.loop import TrainConfig

from .helpers import tiny_config


# -- a tiny smooth model, written out by hand for the independent computations --------------------
def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _loss(w: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2 = w
    return F.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)


def _grad(w, x, y):
    w = [t.detach().requires_grad_(True) for t in w]
    return [g.detach() for g in torch.autograd.grad(_loss(w, x, y), w)]


def _data(n: int = 6) -> ClientData:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    return ClientData(x, y, x[:2].clone(), y[:2].clone())


def _algo(batch_size: int = 2, **params) -> PerFedAvg:
    model = _net()
    setup = Setup(model, torch.device("cpu"), TrainConfig(batch_size=batch_size), 1, 3, seed=0)
    return PerFedAvg(PerFedAvgParams(**params), setup)


def _client(data: ClientData, seed: int = 7) -> Client:
    return Client(0, 0, data, {}, torch.Generator().manual_seed(seed))


def _batches(n: int, batch: int, count: int, seed: int = 7) -> list[torch.Tensor]:
    """The documented draw: consecutive slices of randperm(n), a new permutation when one runs short."""
    g, out, order = torch.Generator().manual_seed(seed), [], torch.empty(0, dtype=torch.int64)
    for _ in range(count):
        if order.numel() < batch:
            order = torch.randperm(n, generator=g)
        out.append(order[:batch])
        order = order[batch:]
    return out


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _initial(algo: PerFedAvg) -> list[torch.Tensor]:
    return [p.detach().clone() for p in algo.setup.model.parameters()]


# -- the local steps --------------------------------------------------------------------------
def test_fo_local_steps_equal_a_hand_computed_two_step_update():
    alpha, beta, tau = 0.3, 0.2, 2
    algo, data = _algo(variant="fo", alpha=alpha, beta=beta, tau=tau), _data(6)
    w0 = _initial(algo)
    update = algo.client_update(_client(data), _flat(w0))

    x, y = data.x_train, data.y_train
    batches = _batches(6, 2, 2 * tau)  # D, D' per step: 4 batches of 2 from 6 samples (two permutations)
    w = w0
    for t in range(tau):
        d1, d2 = batches[2 * t], batches[2 * t + 1]
        w_tilde = [p - alpha * g for p, g in zip(w, _grad(w, x[d1], y[d1]), strict=True)]
        w = [p - beta * g for p, g in zip(w, _grad(w_tilde, x[d2], y[d2]), strict=True)]
    torch.testing.assert_close(update.payload, _flat(w) - _flat(w0), rtol=1e-5, atol=1e-6)
    assert update.payload.norm() > 1e-2
    assert update.weight == 1.0  # uniform by default, the paper's average
    by_samples = _algo(variant="fo", alpha=alpha, beta=beta, tau=tau, weighting="samples")
    assert by_samples.client_update(_client(data), _flat(w0)).weight == 6.0


@pytest.mark.parametrize("hvp", ["exact", "scaled", "paper"])
def test_hf_differs_from_fo_by_the_hessian_vector_correction(hvp):
    alpha, beta, delta = 0.5, 0.5, 1e-3
    data = _data(6)
    fo, hf = (_algo(variant=v, alpha=alpha, beta=beta, tau=1, delta=delta, hvp=hvp) for v in ("fo", "hf"))
    w0 = _initial(fo)
    up_fo = fo.client_update(_client(data), _flat(w0)).payload
    up_hf = hf.client_update(_client(data), _flat(w0)).payload

    x, y = data.x_train, data.y_train
    d1, d2, d3 = _batches(6, 2, 3)
    w_tilde = [p - alpha * g for p, g in zip(w0, _grad(w0, x[d1], y[d1]), strict=True)]
    u = _flat(_grad(w_tilde, x[d2], y[d2]))
    shapes = [p.shape for p in w0]

    def loss_d3(flat):
        parts = flat.split([s.numel() for s in shapes])
        return _loss([c.view(s) for c, s in zip(parts, shapes, strict=True)], x[d3], y[d3])

    _, hvp = torch.autograd.functional.hvp(loss_d3, _flat(w0), u)
    # FO: w0 - beta u;  HF: w0 - beta (u - alpha H u)  =>  HF - FO = alpha beta H u
    correction = (up_hf - up_fo) / (alpha * beta)
    assert hvp.norm() > 1e-2 * u.norm()  # the correction is not negligible here
    torch.testing.assert_close(correction, hvp, rtol=0, atol=2e-3 * float(hvp.abs().max()))
    torch.testing.assert_close(up_fo, -beta * u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["fo", "hf"])
def test_meta_clip_bounds_each_local_steps_meta_gradient_and_keeps_its_direction(variant):
    """One local step: with meta_clip below the meta-gradient's norm, the step is beta * meta_clip long along the
    unclipped step; with a large meta_clip it is the unclipped step."""
    data, beta = _data(6), 0.5
    w0 = _flat(_initial(_algo()))

    def step(clip: float | None) -> torch.Tensor:
        return (
            _algo(variant=variant, alpha=0.5, beta=beta, tau=1, meta_clip=clip).client_update(_client(data), w0).payload
        )

    free = step(None)
    clip = float(free.norm()) / beta / 4  # a quarter of the meta-gradient's norm
    clipped = step(clip)
    assert free.norm() > 1e-2
    torch.testing.assert_close(clipped.norm(), free.norm() / 4, rtol=1e-4, atol=0)
    torch.testing.assert_close(clipped / clipped.norm(), free / free.norm(), rtol=0, atol=1e-5)
    assert torch.equal(step(8 * clip), free)


# -- the Hessian-vector products -------------------------------------------------------------
def _hessian_times(model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The full Hessian of the batch loss (torch.autograd.functional.hessian on the flat parameters) times v."""
    params = [p.detach() for p in model.parameters()]
    shapes = [p.shape for p in params]

    def loss(flat):
        parts = flat.split([s.numel() for s in shapes])
        return _loss([c.view(s) for c, s in zip(parts, shapes, strict=True)], x, y)

    return torch.autograd.functional.hessian(loss, _flat(params)) @ v


def _unflat(v: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [c.view(t.shape) for c, t in zip(v.split([t.numel() for t in like]), like, strict=True)]


def test_exact_hvp_equals_the_full_hessian_times_the_vector():
    model, data = _net(), _data(6)
    w = [p.detach().clone() for p in model.parameters()]
    v = torch.randn(sum(t.numel() for t in w), generator=torch.Generator().manual_seed(3))
    got = _flat(hvp_exact(FunctionalModel(model), w, _unflat(v, w), data.x_train, data.y_train))
    expected = _hessian_times(model, data.x_train, data.y_train, v)
    assert expected.norm() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_finite_difference_hvp_approaches_the_exact_one_on_a_smooth_model_and_scaling_keeps_it_there():
    model, data = _net(), _data(6)
    fn, x, y = FunctionalModel(model), data.x_train, data.y_train
    w = [p.detach().clone() for p in model.parameters()]
    v = torch.randn(sum(t.numel() for t in w), generator=torch.Generator().manual_seed(3))
    v = v / v.norm()

    def error(scale: float, delta: float, scaled: bool) -> float:
        exact = _flat(hvp_exact(fn, w, _unflat(scale * v, w), x, y))
        estimate = _flat(hvp_finite_difference(fn, w, _unflat(scale * v, w), x, y, delta, scaled))
        return float((estimate - exact).norm() / exact.norm())

    # a unit vector: both estimators probe w +- delta v; the central difference's error falls as delta does
    errors = [error(1.0, d, scaled) for d in (1e-1, 1e-2) for scaled in (False, True)]
    assert errors[1] == pytest.approx(errors[0], rel=0.05) and errors[3] == pytest.approx(errors[2], rel=0.05)
    assert errors[2] < 0.05 * errors[0] and errors[2] < 1e-3
    # a long vector: the paper's probes move delta ||v|| = 1 away and miss; the scaled ones stay delta away
    assert error(1e3, 1e-3, scaled=False) > 0.1
    assert error(1e3, 1e-3, scaled=True) < 1e-3
    zero = hvp_finite_difference(fn, w, _unflat(0 * v, w), x, y, 1e-3, scaled=True)
    assert all(not t.any() for t in zero)


# -- evaluation --------------------------------------------------------------------------------
def test_load_for_eval_takes_one_alpha_step_and_changes_no_state():
    alpha = 0.7
    algo, data = _algo(batch_size=4, alpha=alpha), _data(6)
    w0 = _flat(_initial(algo))
    payload = w0.clone()
    algo.load_for_eval(_client(data, seed=3), payload)
    got = _flat([p.detach() for p in algo.setup.model.parameters()])
    (d,) = _batches(6, 4, 1, seed=3)
    w = [p.detach().clone() for p in _net().parameters()]
    expected = _flat([p - alpha * g for p, g in zip(w, _grad(w, data.x_train[d], data.y_train[d]), strict=True)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(payload, w0)  # the global model is untouched
    assert algo.client_state_spec(0) == {}  # clients keep nothing that evaluation could change

    full = _algo(batch_size=4, alpha=alpha, eval_full_batch=True, eval_steps=2)
    full.load_for_eval(_client(data, seed=3), payload)
    for _ in range(2):
        w = [p - alpha * g for p, g in zip(w, _grad(w, data.x_train, data.y_train), strict=True)]
    torch.testing.assert_close(_flat([p.detach() for p in full.setup.model.parameters()]), _flat(w))


def test_personalised_accuracy_in_a_run_is_the_adapted_models_and_differs_from_the_global_models(tmp_path):
    cfg = tiny_config(
        tmp_path / "p.h5",
        "perfedavg",
        rounds=2,
        state_every=1,
        **{"algorithm.alpha": 0.1, "algorithm.beta": 0.1, "algorithm.tau": 5},
    )
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    with h5py.File(cfg.output_path) as f:
        snapshots = torch.from_numpy(f["global/state/shared"][...])
        recorded = f["clients/test_acc"][-1]
    data = load_federated(cfg.data, cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    params = list(model.parameters())

    def accuracy(flat: torch.Tensor, client) -> float:
        torch.nn.utils.vector_to_parameters(flat, params)
        with torch.no_grad():
            return float((model(client.x_test).argmax(1) == client.y_test).float().mean())

    personal, global_ = [], []
    for k in range(data.num_clients):
        client = data.client(k)
        order = torch.randperm(len(client.y_train), generator=client_generator(cfg.seed, k, 1))
        idx = order[: cfg.train.batch_size]
        torch.nn.utils.vector_to_parameters(snapshots[-1], params)
        loss = F.cross_entropy(model(client.x_train[idx]), client.y_train[idx])
        grads = torch.autograd.grad(loss, params)
        adapted = snapshots[-1] - 0.1 * torch.cat([g.reshape(-1) for g in grads])
        personal.append(accuracy(adapted, client))
        global_.append(accuracy(snapshots[-1], client))
    np.testing.assert_allclose(recorded, personal, atol=1e-6)
    assert np.abs(np.array(personal) - np.array(global_)).max() > 0.05

    # round 1's global model is w0 plus the uniform mean of the sampled clients' local updates
    algo = _engine_algo(cfg)
    w0 = algo.shared.w.clone()
    updates = []
    for k in sample_clients(cfg.seed, 0, data.num_clients, cfg.sampled_per_round):
        c = Client(int(k), 0, data.client(int(k)), {}, client_generator(cfg.seed, int(k), 0))
        updates.append(algo.client_update(c, w0).payload)
    torch.testing.assert_close(snapshots[0], w0 + torch.stack(updates).mean(0), rtol=1e-5, atol=1e-6)


def _engine_algo(cfg) -> PerFedAvg:
    data = load_federated(cfg.data, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    algo = PerFedAvg(
        PerFedAvgParams.model_validate({k: v for k, v in cfg.algorithm.items() if k != "name"}),
        Setup(model, torch.device("cpu"), cfg.train, data.num_clients, data.num_classes, cfg.seed),
    )
    algo.init_server()
    return algo


def test_server_state_round_trips():
    algo = _algo(server_opt={"name": "sgd", "lr": 1.0, "momentum": 0.5})
    algo.init_server()
    algo.aggregate(0, WeightedMean(torch.ones(algo.up_numel()), 2.0, 2))
    other = _algo(server_opt={"name": "sgd", "lr": 1.0, "momentum": 0.5})
    other.init_server()
    other.load_server_state(unflatten_state(flatten_state(algo.server_state())))  # as through the file
    for a in (algo, other):
        a.aggregate(1, WeightedMean(torch.full((a.up_numel(),), 0.5), 2.0, 2))
    torch.testing.assert_close(algo.downlink(2, [0], "train"), other.downlink(2, [0], "train"))
