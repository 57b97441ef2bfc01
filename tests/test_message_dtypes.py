"""Message dtypes: payloads move in the dtype their message declares, and cost itemsize * numel bytes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pfl_mpi.algorithms import Broadcast, Gathered, PerClient, Update, WeightedSum
from pfl_mpi.algorithms.base import pack, packed_size, unpack
from pfl_mpi.runtime import Engine
from pfl_mpi.runtime.placement import sample_clients
from pfl_mpi.wire.uplink import UplinkBuffer

from .helpers import RecordingWorld, tiny_config

sys.path.insert(0, str(Path(__file__).parent / "plugins"))
import dtype_probe  # noqa: E402  (registers the algorithm)


def _probe(tmp_path, **params):
    sets = {"plugins": "[dtype_probe]", "rounds": 2, "clients_per_round": 4, "model.name": "logreg"}
    sets.update({f"algorithm.{k}": v for k, v in params.items()})
    cfg = tiny_config(tmp_path / "probe.h5", "dtype_probe", **sets)
    world = RecordingWorld()
    engine = Engine(cfg, world, show_progress=False)
    assert engine.run() == 0
    return cfg, engine, world


def _of(world, label):
    return [c for c in world.calls if c[1] == label]


# -- the message kinds ------------------------------------------------------------------------


def test_message_kinds_default_to_float32_and_reject_unknown_dtypes():
    for kind in (Broadcast, PerClient, WeightedSum, Gathered):
        assert kind().dtype == torch.float32
        with pytest.raises(ValueError, match="not supported"):
            kind(dtype=torch.bool)
    assert Gathered(torch.uint8).dtype == torch.uint8
    with pytest.raises(ValueError, match="not supported"):
        WeightedSum(torch.uint8)  # a weighted sum can be negative


def test_pack_and_unpack_round_trip():
    idx = torch.tensor([3, 0, 70000], dtype=torch.int32)
    val = torch.tensor([1.5, -2.25, 3e-8])
    signs = torch.tensor([1, -1, 0, 1], dtype=torch.int8)
    packed = pack(idx, val, signs)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size((torch.int32, 3), (torch.float32, 3), (torch.int8, 4)) == 12 + 12 + 4
    i, v, s = unpack(packed, (torch.int32, 3), (torch.float32, 3), (torch.int8, 4))
    assert torch.equal(i, idx) and torch.equal(v, val) and torch.equal(s, signs)
    with pytest.raises(ValueError):
        unpack(packed, (torch.float64, 4))


# -- the uplink buffer ------------------------------------------------------------------------


def test_int8_weighted_sum_is_exact_with_the_weight_apart():
    buf = UplinkBuffer(WeightedSum(torch.int8), 5, 3)
    payloads = [torch.tensor([1, -1, 0, 1, 1], dtype=torch.int8), torch.tensor([-1, -1, 1, 1, 0], dtype=torch.int8)]
    for p, w in zip(payloads, (3.0, 2.0), strict=True):
        buf.add(Update(p, w))
    buf.seal()
    assert buf.buf.dtype == np.int8 and buf.buf.nbytes == 5
    np.testing.assert_array_equal(buf.buf, [1, -5, 2, 5, 3])
    np.testing.assert_array_equal(buf.side, [5.0, 5.0])  # summed weight; bound sum |w| max |p|


def test_integer_sum_needs_integer_weights_and_refuses_overflow():
    buf = UplinkBuffer(WeightedSum(torch.int8), 2, 1)
    with pytest.raises(ValueError, match="integer client weights"):
        buf.add(Update(torch.ones(2, dtype=torch.int8), 0.5))
    buf = UplinkBuffer(WeightedSum(torch.int8), 2, 200)
    for _ in range(200):  # 200 > 127: an int8 sum would wrap
        buf.add(Update(torch.ones(2, dtype=torch.int8), 1.0))
    with pytest.raises(OverflowError, match="int8"):
        buf.seal()


def test_payload_must_have_the_declared_dtype():
    buf = UplinkBuffer(Gathered(torch.int8), 3, 1)
    with pytest.raises(TypeError, match="int8"):
        buf.add(Update(torch.ones(3), 1.0))  # float32 would be truncated silently
    buf = UplinkBuffer(Gathered(), 3, 1)
    buf.add(Update(torch.ones(3, dtype=torch.float64), 1.0))  # float32 messages convert floats, as before
    assert buf.buf.dtype == np.float32


# -- the engine -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "down,down_dtype,itemsize",
    [("broadcast", "int8", 1), ("broadcast", "float16", 2), ("per_client", "float16", 2), ("per_client", "uint8", 1)],
)
def test_downlink_moves_declared_dtype_and_bytes(tmp_path, down, down_dtype, itemsize):
    cfg, engine, world = _probe(tmp_path, down=down, down_dtype=down_dtype, up="gathered", up_dtype="float32")
    n = engine.algo.params.numel
    sent = _of(world, "down")
    assert len(sent) == 2
    per_round = n * itemsize * (1 if down == "broadcast" else cfg.clients_per_round)
    for _, _, dtype, nbytes in sent:
        assert nbytes == per_round
        assert dtype == np.uint8  # any dtype but float32 moves as its bytes
    # the clients checked, bit for bit, that they received what the server sent (dtype_probe._check)


@pytest.mark.parametrize("up_dtype,itemsize", [("int8", 1), ("int16", 2), ("float16", 2), ("float64", 8)])
def test_weighted_sum_in_a_dtype(tmp_path, up_dtype, itemsize):
    cfg, engine, world = _probe(tmp_path, up="sum", up_dtype=up_dtype)
    algo, n = engine.algo, engine.algo.params.numel
    ups = _of(world, "up")
    # per round: the payload sum in its dtype, then [summed weight, bound] in float64
    assert [(c[0], c[2], c[3]) for c in ups] == [("reduce", np.dtype(up_dtype), itemsize * n), ("reduce", "f8", 16)] * 2
    for t, got in enumerate(algo.received):
        clients = sample_clients(cfg.seed, t, cfg.data.num_clients, cfg.clients_per_round)
        weights = [dtype_probe.client_weight(int(k)) for k in clients]
        total = sum(
            w * dtype_probe.client_payload(algo, t, int(k)).double() for k, w in zip(clients, weights, strict=True)
        )
        assert got.sum.dtype == getattr(torch, up_dtype)
        assert torch.equal(got.sum.double(), total)  # exact: small integers
        assert got.total_weight == sum(weights) and got.count == len(clients)
        torch.testing.assert_close(got.mean, (total / sum(weights)).float())


def test_float32_weighted_sum_keeps_its_weight_slot(tmp_path):
    _, engine, world = _probe(tmp_path, up="sum", up_dtype="float32")
    n = engine.algo.params.numel
    assert [(c[2], c[3]) for c in _of(world, "up")] == [(np.float32, 4 * (n + 1))] * 2


@pytest.mark.parametrize("up_dtype,itemsize", [("uint8", 1), ("int8", 1), ("float16", 2), ("int32", 4)])
def test_gathered_in_a_dtype(tmp_path, up_dtype, itemsize):
    cfg, engine, world = _probe(tmp_path, up="gathered", up_dtype=up_dtype)
    algo, n = engine.algo, engine.algo.params.numel
    ups = _of(world, "up")
    assert [(c[0], c[3]) for c in ups] == [("gatherv", itemsize * n * cfg.clients_per_round)] * 2
    for t, got in enumerate(algo.received):
        assert got.payloads.dtype == getattr(torch, up_dtype)
        expected = torch.stack([dtype_probe.client_payload(algo, t, k) for k in got.clients])
        assert torch.equal(got.payloads, expected)
        np.testing.assert_array_equal(got.weights, [dtype_probe.client_weight(k) for k in got.clients])
