"""Batched clients under MPI: the blocks a rank forms depend on the clients it hosts, the results do not."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from pfl_mpi.comm.mpi_world import MPIWorld
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.runtime import Engine

from ..helpers import committed, tiny_config

SETS = {"data.num_clients": 14, "clients_per_round": 11, "data.partition": "dirichlet", "state_every": 1}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["fedavg", "fedper", "fedprox", "fedrep"])
def test_batched_results_do_not_depend_on_the_ranks(algorithm, mpi_tmp_path):
    """P ranks with blocks of 3 against one process with blocks of 3 and one process without blocks: the first
    round's per-client results are bit for bit the same (a client's result does not depend on its block); later
    rounds differ only by the order of the uplink's float sums."""
    world = MPIWorld()
    cfg = tiny_config(mpi_tmp_path / "mpi.h5", algorithm, **SETS, **{"train.client_batch": 3})
    assert Engine(cfg, world, show_progress=False).run() == 0
    try:  # rank 0 checks; the others wait at the barrier, also when a check fails
        if world.rank == 0:
            for name, batch in (("one.h5", 3), ("sequential.h5", 1)):
                cfg = tiny_config(mpi_tmp_path / name, algorithm, **SETS, **{"train.client_batch": batch})
                assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
            mpi, one, seq = (mpi_tmp_path / n for n in ("mpi.h5", "one.h5", "sequential.h5"))
            first = committed(mpi, "clients", "train_loss")[0]
            assert np.isfinite(first).sum() == SETS["clients_per_round"]
            np.testing.assert_array_equal(first, committed(one, "clients", "train_loss")[0])
            for other in (one, seq):
                for name in ("train_loss", "test_acc", "test_loss"):
                    a, b = committed(mpi, "rounds", name), committed(other, "rounds", name)
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
                with h5py.File(mpi) as a, h5py.File(other) as b:
                    if "personal" in a["clients/state"]:  # after round 1: exact against blocks on one process
                        state, theirs = a["clients/state/personal"][...], b["clients/state/personal"][...]
                        if other == one:
                            np.testing.assert_array_equal(state[0], theirs[0])
                        np.testing.assert_allclose(state, theirs, atol=1e-5)
                    np.testing.assert_allclose(a["global/state/shared"][...], b["global/state/shared"][...], atol=1e-5)
    finally:
        MPI.COMM_WORLD.Barrier()
