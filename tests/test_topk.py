"""Top-k sparsification with error feedback: what is sent, what is kept, that nothing is lost, and the bytes."""

from __future__ import annotations

import math

import numpy as np
import torch

from pfl_mpi.algorithms.base import Collected
from pfl_mpi.algorithms.fedavg import FedAvg, FedAvgParams
from pfl_mpi.algorithms.topk import TopK, TopKParams, compress, decode, encode, payload_size, unpack_sparse
from pfl_mpi.runtime import Engine

from .helpers import RecordingWorld, tiny_config
from .test_robust import _client, _setup


def test_compress_sends_the_k_largest_and_keeps_the_rest():
    a = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 4.0])
    index, values, residual = compress(a, 3)
    assert index.dtype == torch.int32 and values.dtype == torch.float32
    assert index.tolist() == [1, 3, 5] and values.tolist() == [-5.0, 2.0, 4.0]
    torch.testing.assert_close(residual, torch.tensor([0.1, 0, 0.3, 0, -0.2, 0]))


def test_error_feedback_eventually_transmits_every_coordinates_mass():
    """Over rounds, the sum of what a client sent per coordinate approaches the sum of its updates."""
    d, k, rounds = 200, 10, 2000
    g = torch.Generator().manual_seed(0)
    drift = 0.02 + torch.rand(d, generator=g) * 0.08  # every coordinate has mass, most of it too small for one top-k
    residual, sent, total = (
        torch.zeros(d, dtype=torch.float64),
        torch.zeros(d, dtype=torch.float64),
        torch.zeros(d, dtype=torch.float64),
    )
    ever = torch.zeros(d, dtype=torch.bool)
    for _ in range(rounds):
        update = drift + 0.05 * torch.randn(d, generator=g)
        total += update
        index, values, residual = compress(residual + update, k)
        sent[index.long()] += values.double()
        ever[index.long()] = True
        torch.testing.assert_close(sent + residual, total)  # nothing is ever lost
    assert bool(ever.all())  # every coordinate was sent at some point
    # the residual stays bounded while the total grows: sent / total -> 1 per coordinate
    assert float((sent - total).abs().max()) < 0.05 * float(total.abs().min())
    # without error feedback, the small coordinates are never sent
    plain = torch.zeros(d, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    drift = 0.02 + torch.rand(d, generator=g) * 0.08
    for _ in range(rounds):
        index, values, _ = compress(drift + 0.05 * torch.randn(d, generator=g), k)
        plain[index.long()] += values.double()
    assert float((plain - total).abs().max()) > 10 * float((sent - total).abs().max())


def _algo(**params) -> TopK:
    algo = TopK(TopKParams.model_validate(params), _setup())
    algo.init_server()
    return algo


def test_client_packs_indices_and_values_and_keeps_the_residual():
    algo = _algo(k=4)
    d = algo.shared.numel
    state = algo.init_client_state(2)
    assert algo.client_state_spec(0) == {"residual": d} and torch.equal(state["residual"], torch.zeros(d))
    state["residual"] += torch.linspace(-0.5, 0.5, d)
    before = state["residual"].clone()
    client = _client(2)
    client.state = state
    w = torch.zeros(d)
    update = algo.client_update(client, w.clone())
    bits = math.ceil(math.log2(d))  # per index: d = 15 needs 4 bits, so 4 indices take 2 bytes
    assert update.payload.dtype == torch.uint8 and update.payload.numel() == math.ceil(4 * bits / 8) + 4 * 4
    assert update.payload.numel() == algo.up_numel()
    index, values = unpack_sparse(update.payload, 4, d)
    u = FedAvg(FedAvgParams(), _setup()).client_update(_client(2), w.clone()).payload  # the same training
    accumulated = before + u
    expected = accumulated.abs().topk(4).indices.sort().values
    assert index.tolist() == expected.tolist()
    torch.testing.assert_close(values, accumulated[expected])
    sent = torch.zeros(d)
    sent[index.long()] = values
    torch.testing.assert_close(state["residual"] + sent, accumulated)


def test_server_decodes_the_weighted_mean_of_sparse_updates():
    algo = _algo(k=2)
    d = algo.shared.numel
    rows = [compress(torch.randn(d, generator=torch.Generator().manual_seed(i)), 2) for i in range(3)]
    payloads = torch.stack([encode(i, v, d) for i, v, _ in rows])
    weights = torch.tensor([1.0, 2.0, 5.0])
    dense = np.zeros(d)
    for (i, v, _), w in zip(rows, weights.tolist(), strict=True):
        for j, x in zip(i.tolist(), v.tolist(), strict=True):
            dense[j] += w * x / 8.0
    up = Collected([0, 1, 2], payloads, weights)
    np.testing.assert_allclose(up.weighted_mean(lambda row: decode(row, 2, d), d).numpy(), dense, atol=1e-6)
    w0 = algo.shared.w.clone()
    algo.aggregate(0, up)
    np.testing.assert_allclose((algo.shared.w - w0).numpy(), dense, atol=1e-6)


def test_run_gathers_the_packed_size_per_client(tmp_path):
    cfg = tiny_config(tmp_path / "topk.h5", "topk", **{"algorithm.k": 25, "rounds": 3})
    world = RecordingWorld()
    engine = Engine(cfg, world, show_progress=False)
    assert engine.run() == 0
    d = engine.algo.shared.numel
    ups = [(c[0], c[2], c[3]) for c in world.calls if c[1] == "up"]
    size = math.ceil(25 * math.ceil(math.log2(d)) / 8) + 4 * 25  # bit-packed indices, float32 values
    assert payload_size(25, d) == size
    assert ups == [("gatherv", np.uint8, size * cfg.clients_per_round)] * 3  # not 4 d per client
    assert size < 8 * 25 < 4 * d  # smaller than int32 indices
