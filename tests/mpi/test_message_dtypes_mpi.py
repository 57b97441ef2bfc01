"""Message dtypes under MPI: the ledger's bytes are itemsize * numel of the declared dtype, values arrive intact."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from mpi4py import MPI

from pfl_mpi.comm import LABELS
from pfl_mpi.comm.mpi_world import MPIWorld
from pfl_mpi.runtime import Engine

from ..helpers import tiny_config

sys.path.insert(0, str(Path(__file__).parents[1] / "plugins"))
import dtype_probe  # noqa: E402


def _run(path, **params):
    sets = {"plugins": "[dtype_probe]", "rounds": 2, "clients_per_round": 6, "model.name": "logreg"}
    sets.update({f"algorithm.{k}": v for k, v in params.items()})
    cfg = tiny_config(path, "dtype_probe", **sets)
    engine = Engine(cfg, MPIWorld(), show_progress=False)
    assert engine.run() == 0
    return cfg, engine


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("up_dtype,itemsize", [("int8", 1), ("float16", 2)])
def test_broadcast_int8_and_weighted_sum_bytes(up_dtype, itemsize, mpi_tmp_path):
    cfg, engine = _run(mpi_tmp_path / "sum.h5", down="broadcast", down_dtype="int8", up="sum", up_dtype=up_dtype)
    n, p = engine.algo.params.numel, MPI.COMM_WORLD.Get_size()
    if engine.world.rank == 0:
        with h5py.File(cfg.output_path) as f:
            sent, received, calls = (f["comm"][k][...] for k in ("bytes_sent", "bytes_received", "calls"))
        down, up = LABELS.index("down"), LABELS.index("up")
        workers = range(1, p)
        assert np.all(received[:, workers, down] == n)  # int8: one byte per element
        assert np.all(sent[:, 0, down] == n * (p - 1))
        assert np.all(sent[:, workers, up] == itemsize * n + 16)  # payload sum + float64 [weight, bound]
        assert np.all(calls[:, workers, up] == 2)
        np.testing.assert_array_equal(received[:, 0, up], sent[:, 1:, up].sum(axis=1))
        for t, got in enumerate(engine.algo.received):
            total = sum(
                dtype_probe.client_weight(k) * dtype_probe.client_payload(engine.algo, t, k).double()
                for k in np.flatnonzero(_participated(cfg.output_path)[t])
            )
            assert got.sum.dtype == getattr(torch, up_dtype)
            assert torch.equal(got.sum.double(), total)
    MPI.COMM_WORLD.Barrier()


@pytest.mark.mpi(min_size=2)
def test_per_client_float16_and_gathered_uint8_bytes(mpi_tmp_path):
    cfg, engine = _run(
        mpi_tmp_path / "gather.h5", down="per_client", down_dtype="float16", up="gathered", up_dtype="uint8"
    )
    n, p = engine.algo.params.numel, MPI.COMM_WORLD.Get_size()
    if engine.world.rank == 0:
        with h5py.File(cfg.output_path) as f:
            sent, received = f["comm/bytes_sent"][...], f["comm/bytes_received"][...]
            hosts = f["partition/host_rank"][...]
        sampled = _participated(cfg.output_path).astype(bool)
        down, up, eval_down = LABELS.index("down"), LABELS.index("up"), LABELS.index("eval_down")
        for t in range(cfg.rounds):
            for rank in range(1, p):
                mine = int(np.sum(sampled[t] & (hosts == rank)))
                assert received[t, rank, down] == 2 * n * mine  # float16
                assert sent[t, rank, up] == 1 * n * mine  # uint8
                assert received[t, rank, eval_down] == 2 * n * int(np.sum(hosts == rank))
        for t, got in enumerate(engine.algo.received):
            expected = torch.stack([dtype_probe.client_payload(engine.algo, t, k) for k in got.clients])
            assert got.payloads.dtype == torch.uint8 and torch.equal(got.payloads, expected)
    MPI.COMM_WORLD.Barrier()


def _participated(path):
    with h5py.File(path) as f:
        return f["clients/participated"][: int(f.attrs["rounds_completed"])]
