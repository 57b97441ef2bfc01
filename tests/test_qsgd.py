"""QSGD: an unbiased quantiser with the paper's variance bound, packed to 4 ceil(d / bucket) + ceil(d b / 8) bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pfl_mpi.algorithms.base import Collected, unpack
from pfl_mpi.algorithms.bitpack import unpack_codes
from pfl_mpi.algorithms.qsgd import QSGD, QSGDParams, dequantize, quantize
from pfl_mpi.runtime import Engine

from .helpers import RecordingWorld, tiny_config
from .test_robust import _client, _setup


def test_levels_norms_and_exact_values():
    v = torch.tensor([3.0, -4.0, 0.0, 0.0, 1.0])
    norms, levels = quantize(v, 4, 3, torch.Generator().manual_seed(0))
    assert levels.dtype == torch.int8 and norms.dtype == torch.float32
    torch.testing.assert_close(norms, torch.tensor([5.0, 1.0]))  # buckets [3, -4, 0] and [0, 1]
    assert levels.abs().max() <= 4
    # |v_i| / norm * s: 2.4 -> 2 or 3 (positive), 3.2 -> 3 or 4 (negative), 0 -> 0; 4 -> 4 exactly
    assert levels[0] in (2, 3) and levels[1] in (-3, -4) and levels[2] == 0 and levels[3] == 0 and levels[4] == 4
    torch.testing.assert_close(dequantize(norms, levels, 4, 3)[3:], torch.tensor([0.0, 1.0]))


def test_quantisation_is_unbiased_with_the_papers_variance_bound():
    d, s, bucket, n = 300, 4, 100, 4000
    v = torch.randn(d, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    samples = torch.stack([dequantize(*quantize(v, s, bucket, g), s, bucket) for _ in range(n)]).double()
    mean = samples.mean(dim=0)
    var = ((samples - v.double()) ** 2).sum(dim=1).mean()
    bound = min(bucket / s**2, math.sqrt(bucket) / s) * float((v.double() ** 2).sum())  # Lemma 3.1, per bucket
    assert float(var) <= bound
    # each coordinate's estimate is within 5 standard errors of v
    se = samples.std(dim=0) / math.sqrt(n)
    assert bool(((mean - v.double()).abs() <= 5 * se + 1e-7).all())
    assert float((mean - v.double()).norm() / v.norm()) < 0.02


def _algo(**params) -> QSGD:
    algo = QSGD(QSGDParams.model_validate(params), _setup())
    algo.init_server()
    return algo


def test_client_payload_size_and_server_decoding():
    algo = _algo(s=8, bucket_size=4)
    d = algo.shared.numel  # 15: 4 buckets
    assert algo.up_numel() == 4 * 4 + math.ceil(d * 5 / 8)  # levels -8..8: 17 codes, 5 bits
    payloads, expected = [], []
    for k in (0, 1):
        update = algo.client_update(_client(k), algo.shared.w.clone())
        assert update.payload.dtype == torch.uint8 and update.payload.numel() == algo.up_numel()
        norms, codes = unpack(update.payload, (torch.float32, 4), (torch.uint8, math.ceil(d * 5 / 8)))
        levels = unpack_codes(codes, 5, d) - 8
        payloads.append(update.payload)
        expected.append(dequantize(norms, levels, 8, 4).double().numpy())
    weights = torch.tensor([20.0, 60.0])
    w0 = algo.shared.w.clone()
    algo.aggregate(0, Collected([0, 1], torch.stack(payloads), weights))
    np.testing.assert_allclose((algo.shared.w - w0).numpy(), 0.25 * expected[0] + 0.75 * expected[1], atol=1e-6)
    with pytest.raises(ValueError):
        QSGDParams(s=128)  # levels are int8


def test_run_gathers_the_compact_size(tmp_path):
    cfg = tiny_config(tmp_path / "qsgd.h5", "qsgd", **{"algorithm.bucket_size": 256, "rounds": 3})
    world = RecordingWorld()
    engine = Engine(cfg, world, show_progress=False)
    assert engine.run() == 0
    d = engine.algo.shared.numel
    size = 4 * math.ceil(d / 256) + math.ceil(d * 6 / 8)  # default s = 16: 33 codes, 6 bits
    ups = [(c[0], c[2], c[3]) for c in world.calls if c[1] == "up"]
    assert ups == [("gatherv", np.uint8, size * cfg.clients_per_round)] * 3
