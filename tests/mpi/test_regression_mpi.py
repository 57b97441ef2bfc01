"""Regression on a file's real-valued targets under MPI: a run on P ranks, and one stopped after three rounds and
resumed, record what one process records (metrics up to float summation order, the same global model)."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from pfl_mpi.comm.mpi_world import MPIWorld
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.runtime import Engine

from ..helpers import committed, last_global_state
from ..test_regression_data import regression_config, write_regression_file


def _run(cfg, world, resume: bool = False) -> Engine:
    engine = Engine(cfg, world, resume=resume, show_progress=False)
    assert engine.run() == 0
    return engine


@pytest.mark.mpi(min_size=2)
def test_regression_on_p_ranks_and_resumed_equals_one_process(mpi_tmp_path):
    world = MPIWorld()
    data = mpi_tmp_path / "reg.npz"
    if world.rank == 0:
        write_regression_file(data, width=2)
    MPI.COMM_WORLD.Barrier()
    _run(regression_config(mpi_tmp_path / "mpi.h5", data), world)
    resumed = mpi_tmp_path / "resumed.h5"
    _run(regression_config(resumed, data, rounds=3), world)
    assert _run(regression_config(resumed, data), world, resume=True).start_round == 3
    if world.rank == 0:
        one = regression_config(mpi_tmp_path / "one.h5", data)
        _run(one, SerialWorld())
        for path in (mpi_tmp_path / "mpi.h5", resumed):
            for name in ("train_loss", "test_mse", "test_rmse"):
                np.testing.assert_allclose(
                    committed(path, "rounds", name), committed(one.output_path, "rounds", name), rtol=1e-5
                )
            np.testing.assert_allclose(
                committed(path, "clients", "test_mse"), committed(one.output_path, "clients", "test_mse"), rtol=1e-5
            )
            np.testing.assert_allclose(last_global_state(path), last_global_state(one.output_path), atol=1e-6)
        assert committed(one.output_path, "rounds", "test_mse")[-1] < 0.05
