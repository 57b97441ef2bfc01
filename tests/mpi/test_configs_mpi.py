"""Every shipped experiment (configs/*.yaml), shortened, runs under MPI and gives what one process gives."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from pfl_mpi.comm.mpi_world import MPIWorld
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.config import load_config
from pfl_mpi.runtime import Engine
from pfl_mpi.store.writer import tables_under

from ..helpers import committed

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
SHORT = [
    "rounds=2",
    "clients_per_round=4",
    "data.num_clients=10",
    "eval_every=1",
    "state_every=1",
    "finetune_epochs=1",
    "train.local_epochs=1",
    "data.mnist1d.num_samples=1000",
]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_runs_under_mpi_like_one_process(config, mpi_tmp_path):
    world = MPIWorld()
    cfg = load_config(config, [*SHORT, f"output={mpi_tmp_path / 'mpi.h5'}"])
    engine = Engine(cfg, world, show_progress=False)
    tables = engine.layout.tables()  # client-state table -> (numel, its clients): per architecture group
    assert engine.run() == 0
    if world.rank == 0:
        one = load_config(config, [*SHORT, f"output={mpi_tmp_path / 'one.h5'}"])
        assert Engine(one, SerialWorld(), show_progress=False).run() == 0
        for name in ("train_loss", "test_acc", "finetune_test_acc"):
            a, b = committed(cfg.output_path, "rounds", name), committed(one.output_path, "rounds", name)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
        for name in ("protocol_bytes_down", "protocol_bytes_up", "protocol_eval_bytes_down"):  # exactly, per client
            a, b = committed(cfg.output_path, "clients", name), committed(one.output_path, "clients", name)
            np.testing.assert_array_equal(a, b, err_msg=name)
        with h5py.File(cfg.output_path) as f, h5py.File(one.output_path) as g:
            assert f.attrs["status"] == "completed" and f.attrs["world_size"] == world.size
            assert set(tables_under(f["clients/state"])) == {"round", *tables}
            for name, (numel, clients) in tables.items():
                assert f["clients/state"][name].shape == (2, len(clients), numel)
                np.testing.assert_allclose(f["clients/state"][name][...], g["clients/state"][name][...], atol=1e-5)
            for name in g["global/state"]:
                np.testing.assert_allclose(f["global/state"][name][...], g["global/state"][name][...], atol=1e-5)
    MPI.COMM_WORLD.Barrier()
