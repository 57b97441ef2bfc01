"""Robust aggregation (median, trimmed mean), Byzantine clients and the clients' Gaussian noise.

Expected aggregates are computed directly with numpy, coordinate by coordinate.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pfl_mpi.algorithms.base import Client, Collected, Setup
from pfl_mpi.algorithms.byzantine import Byzantine, ByzantineConfig, gaussian_noise
from pfl_mpi.algorithms.robust import Robust, RobustParams, coordinate_median, trimmed_mean
from pfl_mpi.data import ClientData
from pfl_mpi.runtime import Engine
from pfl_mpi.store import read_summary
from pfl_mpi.training.loop import TrainConfig

from .helpers import RecordingWorld, tiny_config


def _setup(num_clients=10, seed=0) -> Setup:
    torch.manual_seed(0)
    setup = Setup(torch.nn.Linear(4, 3), torch.device("cpu"), TrainConfig(lr=0.1, batch_size=8), num_clients, 3, seed)
    setup.label_distribution = torch.full((3,), 1 / 3)
    return setup


def _client(k: int, round: int = 0) -> Client:
    g = torch.Generator().manual_seed(100 + k)
    x, y = torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    return Client(k, round, ClientData(x, y, x[:5], y[:5]), {}, torch.Generator().manual_seed(k))


def _algo(**params) -> Robust:
    algo = Robust(RobustParams.model_validate(params), _setup())
    algo.init_server()
    return algo


# -- the rules --------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [5, 6])
def test_median_and_trimmed_mean_equal_direct_computations(k):
    x = torch.randn(k, 40, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    np.testing.assert_allclose(coordinate_median(x).numpy(), np.median(x.numpy(), axis=0), rtol=0, atol=1e-15)
    for beta in (0.0, 0.2, 0.34):
        b = int(np.floor(beta * k))
        expected = [np.mean(sorted(col)[b : k - b]) for col in x.numpy().T]
        np.testing.assert_allclose(trimmed_mean(x, beta).numpy(), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "mean"])
def test_median_and_trimmed_mean_resist_a_huge_update_where_the_mean_does_not(rule):
    g = torch.Generator().manual_seed(3)
    honest = 0.01 * torch.randn(6, 15, generator=g) + 0.05  # updates close to 0.05
    attack = torch.full((1, 15), 1e6)
    payloads = torch.cat([honest, attack])
    algo = _algo(rule=rule, beta=0.2)
    w0 = algo.shared.w.clone()
    algo.aggregate(0, Collected(list(range(7)), payloads, torch.ones(7)))
    step = (algo.shared.w - w0).double().numpy()
    x = payloads.double().numpy()
    if rule == "median":
        expected = np.median(x, axis=0)
    elif rule == "trimmed_mean":
        expected = np.sort(x, axis=0)[1:6].mean(axis=0)  # floor(0.2 * 7) = 1 dropped at each end
    else:
        expected = x.mean(axis=0)
    np.testing.assert_allclose(step, expected, rtol=1e-5, atol=1e-6)
    if rule == "mean":
        assert np.all(step > 1e5)  # one client moved the model by 1e6 / 7
    else:
        assert np.all(np.abs(step - 0.05) < 0.05)  # within the honest clients' spread


# -- Byzantine clients ------------------------------------------------------------------------


def test_byzantine_clients_are_chosen_from_the_seed_and_the_list():
    a = Byzantine(ByzantineConfig(fraction=0.3, clients=[7]), seed=1, num_clients=20)
    b = Byzantine(ByzantineConfig(fraction=0.3, clients=[7]), seed=1, num_clients=20)
    assert a.ids == b.ids and 7 in a and len(a.ids - {7}) in (5, 6)
    assert (
        Byzantine(ByzantineConfig(fraction=0.3), seed=2, num_clients=20).ids
        != Byzantine(ByzantineConfig(fraction=0.3), seed=1, num_clients=20).ids
    )
    assert Byzantine(ByzantineConfig(), seed=1, num_clients=20).ids == frozenset()


def test_byzantine_attacks():
    u = torch.randn(50, generator=torch.Generator().manual_seed(0))
    honest, bad = _client(1), _client(2)
    for attack, expected in (("scale", 10 * u), ("sign_flip", -10 * u)):
        byz = Byzantine(ByzantineConfig(clients=[2], attack=attack, scale=10.0), seed=0, num_clients=5)
        assert torch.equal(byz.apply(u, honest), u)
        torch.testing.assert_close(byz.apply(u, bad), expected)
    byz = Byzantine(ByzantineConfig(clients=[2], attack="random", scale=3.0), seed=0, num_clients=5)
    r = byz.apply(torch.zeros(20000), bad)
    assert float(r.std()) == pytest.approx(3.0, rel=0.03)
    assert torch.equal(r, byz.apply(torch.zeros(20000), _client(2)))  # a function of (seed, client, round)
    assert not torch.equal(r, byz.apply(torch.zeros(20000), _client(2, round=1)))


def test_noisy_variant_adds_noise_of_the_configured_scale():
    algo = _algo(rule="median", sigma=0.5)
    quiet = Robust(RobustParams(rule="median"), _setup())
    client = _client(3)
    w = torch.zeros(algo.down_numel())
    noisy_payload = algo.client_update(client, w.clone()).payload
    clean_payload = quiet.client_update(_client(3), w.clone()).payload
    noise = noisy_payload - clean_payload
    torch.testing.assert_close(noise, gaussian_noise(w, 0.5, 0, client), atol=1e-6, rtol=0)
    big = gaussian_noise(torch.zeros(40000), 0.5, 0, client)
    assert float(big.std()) == pytest.approx(0.5, rel=0.02) and abs(float(big.mean())) < 0.01


# -- whole runs -------------------------------------------------------------------------------


def test_median_run_resists_byzantine_clients_and_gathers_every_update(tmp_path):
    attack = {"algorithm.byzantine.clients": "[0,1]", "algorithm.byzantine.scale": "1000.0", "rounds": 3}
    results = {}
    for rule in ("median", "mean"):
        cfg = tiny_config(tmp_path / f"{rule}.h5", "robust", **{"algorithm.rule": rule, **attack})
        world = RecordingWorld()
        engine = Engine(cfg, world, show_progress=False)
        assert engine.run() == 0
        d = engine.algo.up_numel()
        ups = [c for c in world.calls if c[1] == "up"]
        assert [(c[0], c[2], c[3]) for c in ups] == [("gatherv", np.float32, 4 * d * cfg.clients_per_round)] * 3
        results[rule] = read_summary(cfg.output_path).rounds
    # clients 0 and 1 are sampled in some round; the mean then jumps, the median does not
    assert np.max(results["mean"]["update_norm"]) > 100 * np.max(results["median"]["update_norm"])
    assert results["median"]["test_acc"][-1] > results["mean"]["test_acc"][-1]
