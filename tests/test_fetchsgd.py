"""FetchSGD: the Count Sketch (heavy hitters, linearity), the server's sketch-space step against a plain
numpy reference, and its messages (r x c floats up, not d)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pfl_mpi.algorithms.base import WeightedMean
from pfl_mpi.algorithms.fetchsgd import FetchSGD, FetchSGDParams
from pfl_mpi.algorithms.sketch import CountSketch, top_k
from pfl_mpi.errors import ConfigError
from pfl_mpi.runtime import Engine

from .helpers import RecordingWorld, tiny_config
from .test_robust import _client, _setup


def _sketch_reference(cs: CountSketch, v: np.ndarray) -> np.ndarray:
    """S[j, h_j(i)] += s_j(i) v_i, one coordinate at a time."""
    table = np.zeros((cs.rows, cs.columns))
    h, s = cs.buckets.numpy(), cs.signs.numpy()
    for j in range(cs.rows):
        for i in range(cs.d):
            table[j, h[j, i]] += s[j, i] * v[i]
    return table


def test_sketch_equals_its_definition():
    cs = CountSketch(300, 3, 40, seed=5)
    v = np.random.default_rng(0).normal(size=300)
    np.testing.assert_allclose(cs.sketch(torch.from_numpy(v)).numpy(), _sketch_reference(cs, v), atol=1e-5)
    assert set(cs.signs.unique().tolist()) == {-1.0, 1.0}
    assert cs.buckets.min() >= 0 and cs.buckets.max() < 40


def test_unsketch_recovers_the_heavy_coordinates_of_a_sparse_vector():
    # a light coordinate is mistaken for a heavy one when it shares buckets with heavy ones in most rows:
    # expected false positives ~ d C(5, 3) (heavy / c)^3 = 0.06 here
    d, heavy = 50000, 5
    rng = np.random.default_rng(1)
    v = rng.normal(scale=0.01, size=d)
    where = rng.choice(d, heavy, replace=False)
    v[where] = rng.choice([-1, 1], heavy) * rng.uniform(50, 100, heavy)
    cs = CountSketch(d, 5, 1000, seed=2)  # 5000 floats for 50000
    est = cs.unsketch(cs.sketch(torch.from_numpy(v)))
    index, values = top_k(est, heavy)
    assert set(index.tolist()) == set(where.tolist())
    np.testing.assert_allclose(values.numpy(), v[index.numpy()], rtol=0, atol=0.1)


def test_summed_sketches_equal_the_sketch_of_the_sum():
    cs = CountSketch(1000, 5, 64, seed=3)
    g = torch.Generator().manual_seed(0)
    vs = [torch.randn(1000, generator=g) for _ in range(4)]
    weights = [3.0, 1.0, 2.0, 5.0]
    summed = sum(w * cs.sketch(v) for w, v in zip(weights, vs, strict=True))
    torch.testing.assert_close(
        summed, cs.sketch(sum(w * v for w, v in zip(weights, vs, strict=True))), atol=1e-4, rtol=1e-5
    )


def test_zero_clears_the_buckets_of_the_given_coordinates():
    cs = CountSketch(100, 3, 10, seed=4)
    table = torch.ones(3, 10)
    cs.zero(table, torch.tensor([5, 17]))
    for j in range(3):
        for c in range(10):
            cleared = c in (int(cs.buckets[j, 5]), int(cs.buckets[j, 17]))
            assert table[j, c] == (0 if cleared else 1)


def _algo(**params) -> FetchSGD:
    algo = FetchSGD(FetchSGDParams.model_validate(params), _setup())
    algo.init_server()
    return algo


def test_server_step_equals_a_numpy_reference_of_algorithm_1():
    rho, lr, k = 0.9, 0.5, 4
    algo = _algo(rows=3, columns=7, k=k, rho=rho, lr=lr)
    cs = algo.sketcher
    d = algo.shared.numel
    w = algo.shared.w.double().numpy().copy()
    s_u, s_e = np.zeros((3, 7)), np.zeros((3, 7))
    rng = np.random.default_rng(0)
    h, s = cs.buckets.numpy(), cs.signs.numpy()
    for t in range(4):
        u = rng.normal(size=d)
        table = _sketch_reference(cs, u)
        algo.aggregate(t, WeightedMean(torch.from_numpy(table.reshape(-1)).float(), 2.0, 2))
        s_u = rho * s_u + table
        s_e = s_e + lr * s_u
        est = np.median(s * s_e[np.arange(3)[:, None], h], axis=0)
        top = np.argsort(-np.abs(est), kind="stable")[:k]
        for j in range(3):
            s_u[j, h[j, top]] = 0
            s_e[j, h[j, top]] = 0
        w[top] += est[top]
        np.testing.assert_allclose(algo.s_u.numpy(), s_u, atol=1e-4)
        np.testing.assert_allclose(algo.s_e.numpy(), s_e, atol=1e-4)
        np.testing.assert_allclose(algo.shared.w.numpy(), w, atol=1e-4)


def test_clients_send_the_sketch_of_their_update_and_keep_no_state():
    algo = _algo(rows=2, columns=5, k=3)
    assert algo.client_state_spec(0) == {}
    w = algo.shared.w.clone()
    update = algo.client_update(_client(1), w.clone())
    from pfl_mpi.algorithms.fedavg import FedAvg, FedAvgParams

    u = FedAvg(FedAvgParams(), _setup()).client_update(_client(1), w.clone()).payload
    assert update.payload.shape == (10,) and update.weight == 20.0
    np.testing.assert_allclose(
        update.payload.numpy(), _sketch_reference(algo.sketcher, u.double().numpy()).reshape(-1), atol=1e-6
    )


def test_server_state_round_trips():
    a, b = _algo(rows=2, columns=5, k=3), _algo(rows=2, columns=5, k=3)
    mean = torch.randn(10, generator=torch.Generator().manual_seed(0))
    a.aggregate(0, WeightedMean(mean, 1.0, 1))
    b.load_server_state({k: v.clone() for k, v in a.server_state().items()})
    a.aggregate(1, WeightedMean(mean * 2, 1.0, 1))
    b.aggregate(1, WeightedMean(mean * 2, 1.0, 1))
    for k, v in a.server_state().items():
        assert torch.equal(v, b.server_state()[k])
    with pytest.raises(ConfigError, match=r"^algorithm.k: 1000 exceeds the model's 15 shared parameters$"):
        _algo(k=1000)


def test_run_sends_r_times_c_floats_up(tmp_path):
    sets = {"algorithm.rows": 3, "algorithm.columns": 50, "algorithm.k": 40, "rounds": 3}
    cfg = tiny_config(tmp_path / "fetch.h5", "fetchsgd", **sets)
    world = RecordingWorld()
    engine = Engine(cfg, world, show_progress=False)
    assert engine.run() == 0
    d = engine.algo.shared.numel
    ups = [(c[0], c[2], c[3]) for c in world.calls if c[1] == "up"]
    assert ups == [("reduce", np.float32, 4 * (3 * 50 + 1))] * 3  # 4 r c + the weight, not 4 d
    assert 4 * (3 * 50 + 1) < d
