"""signSGD with majority vote: int8 signs, the vote as an int8 Reduce, Byzantine sign flips, noisy signs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pfl_mpi.algorithms.base import WeightedMean
from pfl_mpi.algorithms.byzantine import gaussian_noise
from pfl_mpi.algorithms.fedavg import FedAvg, FedAvgParams
from pfl_mpi.algorithms.signsgd import SignSGD, SignSGDParams, vote_dtype
from pfl_mpi.runtime import Engine
from pfl_mpi.wire.uplink import UplinkBuffer

from .helpers import RecordingWorld, tiny_config
from .test_robust import _client, _setup


def _algo(**params) -> SignSGD:
    algo = SignSGD(SignSGDParams.model_validate(params), _setup())
    algo.init_server()
    return algo


def _honest_update(k: int, w: torch.Tensor) -> torch.Tensor:
    """u_k = w_k - w from FedAvg's client update: the same training, computed apart from signSGD."""
    return FedAvg(FedAvgParams(), _setup()).client_update(_client(k), w.clone()).payload


def test_vote_dtype_holds_every_client():
    assert vote_dtype(10) == torch.int8 and vote_dtype(127) == torch.int8
    assert vote_dtype(128) == torch.int16 and vote_dtype(40000) == torch.int32
    assert _algo().up.dtype == torch.int8


def test_vote_matches_sign_of_the_sum_of_signs_with_a_byzantine_client():
    lr = 0.01
    algo = _algo(lr=lr, byzantine={"clients": [2], "attack": "sign_flip", "scale": 1.0})
    w0 = algo.shared.w.clone()
    clients = [0, 1, 2, 3, 4]
    buf = UplinkBuffer(algo.up, algo.up_numel(), len(clients))
    expected_signs = []
    for k in clients:
        update = algo.client_update(_client(k), w0.clone())
        assert update.payload.dtype == torch.int8 and update.weight == 1.0
        u = _honest_update(k, w0)
        expected_signs.append(-torch.sign(u) if k == 2 else torch.sign(u))
        torch.testing.assert_close(update.payload.float(), expected_signs[-1], rtol=0, atol=0)
        buf.add(update)
    buf.seal()
    summed = torch.from_numpy(buf.buf)
    algo.aggregate(0, WeightedMean(summed.float() / 5, 5.0, 5, summed))
    vote = torch.sign(torch.stack(expected_signs).sum(dim=0))  # the direct computation
    torch.testing.assert_close(algo.shared.w - w0, lr * vote, rtol=0, atol=1e-7)
    assert vote.abs().sum() > 0


def test_noisy_signs_are_signs_of_the_perturbed_update():
    w = torch.zeros(15)
    for sigma in (0.01, 1.0):
        algo = _algo(sigma=sigma)
        client = _client(1)
        got = algo.client_update(client, w.clone()).payload
        u = _honest_update(1, w)
        expected = torch.sign(u + gaussian_noise(u, sigma, 0, client))
        torch.testing.assert_close(got.float(), expected, rtol=0, atol=0)
    # large noise flips signs about half the time
    u = _honest_update(1, w)
    flips = [
        float((algo.client_update(_client(1, t), w.clone()).payload.float() != torch.sign(u)).float().mean())
        for t in range(20)
    ]
    assert 0.2 < np.mean(flips) < 0.8


def test_run_reduces_int8_votes(tmp_path):
    cfg = tiny_config(tmp_path / "sign.h5", "signsgd", **{"algorithm.lr": "0.01", "rounds": 3})
    world = RecordingWorld()
    engine = Engine(cfg, world, show_progress=False)
    assert engine.run() == 0
    d = engine.algo.up_numel()
    ups = [(c[0], c[2], c[3]) for c in world.calls if c[1] == "up"]
    assert ups == [("reduce", np.int8, d), ("reduce", np.float64, 16)] * 3  # d bytes + weight, bound
    assert engine.algo.shared.w.dtype == torch.float32
    with pytest.raises(ValueError):
        SignSGDParams.model_validate({"lr": 0})
