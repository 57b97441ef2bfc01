"""Batched evaluation and fine-tuning under MPI: a rank's blocks depend on the clients it hosts, the scores do not."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from pfl_mpi.comm.mpi_world import MPIWorld
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.runtime import Engine

from ..helpers import committed, tiny_config

# One client per round: the server's mean is that client's payload plus the other ranks' exact zeros, so the
# global model, and every evaluation after it, is bit for bit the same on any number of ranks.
SETS = {"data.num_clients": 14, "clients_per_round": 1, "data.partition": "dirichlet", "rounds": 2}
COLUMNS = ("test_loss", "test_acc", "finetune_test_loss", "finetune_test_acc")


def _scores(path) -> dict[str, np.ndarray]:
    return {name: committed(path, "clients", name) for name in COLUMNS}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["fedavg", "fedper", "local"])
def test_batched_scores_do_not_depend_on_the_ranks(algorithm, mpi_tmp_path):
    """P ranks with blocks of 3 against one process with blocks of 3 (bit for bit) and one process without blocks
    (1e-5): every client's test and fine-tuned scores."""
    world = MPIWorld()
    sets = {**SETS, "finetune_epochs": 2, "train.client_batch": 3}
    cfg = tiny_config(mpi_tmp_path / "mpi.h5", algorithm, **sets)
    assert Engine(cfg, world, show_progress=False).run() == 0
    if world.rank == 0:
        for name, batch in (("one.h5", 3), ("sequential.h5", 1)):
            cfg = tiny_config(mpi_tmp_path / name, algorithm, **{**sets, "train.client_batch": batch})
            assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
        mpi, one, seq = (_scores(mpi_tmp_path / n) for n in ("mpi.h5", "one.h5", "sequential.h5"))
        assert np.isfinite(mpi["finetune_test_acc"][-1]).all()
        for name in COLUMNS:
            np.testing.assert_array_equal(mpi[name], one[name], err_msg=name)
            np.testing.assert_allclose(mpi[name], seq[name], rtol=1e-5, err_msg=name)
        with h5py.File(mpi_tmp_path / "mpi.h5") as f:
            assert f.attrs["client_batch"] == 3
    MPI.COMM_WORLD.Barrier()
