"""The simulated network under MPI: every rank plans the same rounds without a message, so a run on P ranks
records exactly what one process records (metrics up to float summation order)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from pfl_mpi.comm.mpi_world import MPIWorld
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.runtime import Engine

from ..helpers import committed, tiny_config

NETWORK = {
    "network.enabled": "true",
    "network.speed_sigma": 1.0,
    "network.bandwidth_sigma": 0.5,
    "network.seconds_per_sample": 0.005,
    "network.deadline": 1.2,
    "network.dropout": 0.2,
    "network.availability": 0.6,
    "network.availability_amplitude": 0.3,
    "network.availability_period": 4,
    "network.over_selection": 0.5,
}
EXACT = ("network_status", "simulated_seconds", "participated", "protocol_bytes_down", "protocol_bytes_up")
ROUNDS = ("simulated_round_seconds", "simulated_time", "clients_dropped", "clients_missed_deadline", "num_sampled")


def _cfg(path, algorithm):
    return tiny_config(path, algorithm, rounds=5, clients_per_round=4, **NETWORK)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["fedper", "topk"])
def test_network_runs_equal_one_process(algorithm, mpi_tmp_path):
    world = MPIWorld()
    assert Engine(_cfg(mpi_tmp_path / "mpi.h5", algorithm), world, show_progress=False).run() == 0
    if world.rank == 0:
        assert Engine(_cfg(mpi_tmp_path / "one.h5", algorithm), SerialWorld(), show_progress=False).run() == 0
        mpi, one = mpi_tmp_path / "mpi.h5", mpi_tmp_path / "one.h5"
        status = committed(one, "clients", "network_status")
        assert len(np.unique(status)) >= 4, "the scenario should mix statuses"
        for name in EXACT:
            np.testing.assert_array_equal(
                committed(mpi, "clients", name), committed(one, "clients", name), err_msg=name
            )
        for name in ROUNDS:
            np.testing.assert_array_equal(committed(mpi, "rounds", name), committed(one, "rounds", name), err_msg=name)
        for name in ("train_loss", "test_acc", "test_loss"):
            np.testing.assert_allclose(
                committed(mpi, "rounds", name), committed(one, "rounds", name), rtol=1e-5, atol=1e-6, equal_nan=True
            )
        with h5py.File(mpi) as a, h5py.File(one) as b:
            assert a.attrs["world_size"] == world.size and b.attrs["world_size"] == 1
            for name in a["clients/state"]:
                np.testing.assert_allclose(a["clients/state"][name][...], b["clients/state"][name][...], atol=1e-5)
    MPI.COMM_WORLD.Barrier()
