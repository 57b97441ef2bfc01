"""FedOpt server optimisers (Reddi et al., ICLR 2021, Algorithm 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pfl_mpi.algorithms.server_opt import ServerOptConfig, ServerOptimizer

D = 50


def _updates(steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Updates of varying scale, so that Delta^2 is both above and below v at some step."""
    gen = torch.Generator().manual_seed(seed)
    scales = [1.0, 0.05, 2.0, 0.01, 0.5]
    return [scales[t % len(scales)] * torch.randn(D, generator=gen) for t in range(steps)]


def _run(cfg: ServerOptConfig, x0: torch.Tensor, updates: list[torch.Tensor]) -> torch.Tensor:
    x = x0.clone()
    opt = ServerOptimizer(cfg, x.numel())
    for u in updates:
        opt.step(x, u)
    return x


def test_sgd_lr1_is_fedavg_exactly():
    x0 = torch.randn(D)
    (u,) = _updates(1)
    x = x0.clone()
    ServerOptimizer(ServerOptConfig(), D).step(x, u)
    assert torch.equal(x, x0 + u)


def test_sgd_momentum_two_steps():
    cfg = ServerOptConfig(name="sgd", lr=0.5, momentum=0.9)
    x = torch.tensor([1.0, -2.0, 0.0])
    opt = ServerOptimizer(cfg, 3)
    d1, d2 = torch.tensor([1.0, 2.0, -4.0]), torch.tensor([-1.0, 0.5, 2.0])
    opt.step(x, d1)  # buf = d1; x += 0.5 d1
    torch.testing.assert_close(x, torch.tensor([1.5, -1.0, -2.0]))
    opt.step(x, d2)  # buf = 0.9 d1 + d2 = [-0.1, 2.3, -1.6]; x += 0.5 buf
    torch.testing.assert_close(x, torch.tensor([1.45, 0.15, -2.8]))


def _numpy_fedopt(name, lr, beta1, beta2, tau, x0, updates):
    """Reddi et al., Algorithm 2, in float64 numpy; also returns whether yogi's sign took both values."""
    x = x0.astype(np.float64)
    m = np.zeros_like(x)
    v = np.full_like(x, tau**2)
    signs = set()
    for d in updates:
        d = d.astype(np.float64)
        m = beta1 * m + (1 - beta1) * d
        if name == "adagrad":
            v = v + d**2
        elif name == "adam":
            v = beta2 * v + (1 - beta2) * d**2
        else:
            s = np.sign(v - d**2)
            signs |= set(s.tolist())
            v = v - (1 - beta2) * d**2 * s
        x = x + lr * m / (np.sqrt(v) + tau)
    return x, signs


@pytest.mark.parametrize("name", ["adam", "yogi", "adagrad"])
def test_adaptive_matches_numpy(name):
    cfg = ServerOptConfig(name=name, lr=0.03, beta1=0.8, beta2=0.95, tau=1e-2)
    x0 = torch.randn(D, generator=torch.Generator().manual_seed(1))
    updates = _updates(3)
    got = _run(cfg, x0, updates)
    want, signs = _numpy_fedopt(name, 0.03, 0.8, 0.95, 1e-2, x0.numpy(), [u.numpy() for u in updates])
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(want, x0.numpy())
    if name == "yogi":
        assert signs == {-1.0, 1.0}  # both branches of yogi's update were exercised


def test_yogi_differs_from_adam_when_update_dominates():
    d1, d2 = torch.ones(4), 2 * torch.ones(4)  # after step 1 v ~ 0.01 < Delta^2 = 4 at step 2
    states = {}
    for name in ("adam", "yogi"):
        x = torch.zeros(4)
        opt = ServerOptimizer(ServerOptConfig(name=name), 4)
        opt.step(x, d1)
        v1 = opt.state_dict()["v"].clone()
        opt.step(x, d2)
        states[name] = (x, v1, opt.state_dict()["v"])
    (xa, va1, va2), (xy, vy1, vy2) = states["adam"], states["yogi"]
    torch.testing.assert_close(vy2, vy1 + 0.01 * 4)  # additive: v + (1 - beta2) Delta^2
    torch.testing.assert_close(va2, 0.99 * va1 + 0.01 * 4)  # multiplicative decay
    assert torch.all(vy2 > va2)
    assert not torch.allclose(xa, xy, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "cfg",
    [
        ServerOptConfig(name="sgd", lr=0.7),
        ServerOptConfig(name="sgd", lr=0.7, momentum=0.9),
        ServerOptConfig(name="adam", lr=0.01),
        ServerOptConfig(name="yogi", lr=0.01),
        ServerOptConfig(name="adagrad", lr=0.01),
    ],
    ids=["sgd", "sgdm", "adam", "yogi", "adagrad"],
)
def test_resume_from_state_dict_is_exact(cfg):
    updates = _updates(5, seed=2)
    x0 = torch.randn(D)
    uninterrupted = _run(cfg, x0, updates)

    x = x0.clone()
    first = ServerOptimizer(cfg, D)
    for u in updates[:2]:
        first.step(x, u)
    state = first.state_dict()
    assert state["step"].item() == 2
    assert all(isinstance(t, torch.Tensor) for t in state.values())
    first.step(x.clone(), updates[2])  # the saved state is a copy: later steps do not change it
    resumed = ServerOptimizer(cfg, D)
    resumed.load_state_dict(state)
    assert resumed.steps == 2
    for u in updates[2:]:
        resumed.step(x, u)
    assert torch.equal(x, uninterrupted)


def test_load_state_dict_rejects_mismatch():
    adam = ServerOptimizer(ServerOptConfig(name="adam"), D)
    with pytest.raises(ValueError):
        adam.load_state_dict(ServerOptimizer(ServerOptConfig(), D).state_dict())
    with pytest.raises(ValueError):
        adam.load_state_dict(ServerOptimizer(ServerOptConfig(name="adam"), D + 1).state_dict())
    with pytest.raises(ValueError):
        adam.step(torch.zeros(D + 1), torch.zeros(D + 1))


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "rmsprop"},
        {"lr": 0},
        {"lr": -1.0},
        {"lr": float("inf")},
        {"momentum": 1.0},
        {"momentum": -0.1},
        {"beta1": 1.0},
        {"beta2": -0.5},
        {"tau": 0},
        {"name": "adam", "momentum": 0.9},
        {"betas": [0.9, 0.99]},
    ],
)
def test_invalid_config_rejected(bad):
    with pytest.raises(ValidationError):
        ServerOptConfig(**bad)
