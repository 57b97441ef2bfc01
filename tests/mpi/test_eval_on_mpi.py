"""``data.eval_on: [val, test]`` under MPI: the validation and test metrics of P ranks (through the CLI) equal one
process's, and a run stopped and resumed on P ranks equals the straight one bit for bit."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from pfl_mpi.cli import main
from pfl_mpi.comm.mpi_world import MPIWorld
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.config import load_config
from pfl_mpi.runtime import Engine

from ..helpers import committed
from ..test_datasets_fixtures import write_split_file

SETS = ["rounds=4", "eval_every=2", "finetune_epochs=1", "data.eval_on=[val, test]"]
PREFIXES = ("val_", "test_", "finetune_", "train_")


def _config(root: Path) -> Path:
    """FedPer on an own .h5 with string client ids and its own train/val/test split."""
    path = root / "own.yaml"
    path.write_text(
        "name: own-val\nseed: 0\nclients_per_round: 3\nstate_every: 1\n"
        f"data: {{name: file, path: {root / 'own.h5'}, num_clients: 5, min_samples: 2}}\n"
        "model: {name: mlp, hidden: [8]}\ntrain: {batch_size: 4}\nalgorithm: {name: fedper}\n",
        encoding="utf-8",
    )
    return path


def _metrics(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", locking=False) as f:
        names = [(g, n) for g in ("rounds", "clients") for n in f[g] if n.startswith(PREFIXES)]
    return {f"{g}/{n}": committed(path, g, n) for g, n in names}


@pytest.mark.mpi(min_size=2)
def test_val_and_test_on_p_ranks_and_resumed_equal_one_process(mpi_tmp_path: Path) -> None:
    comm = MPI.COMM_WORLD
    if comm.Get_rank() == 0:
        write_split_file(mpi_tmp_path / "own.h5")
        _config(mpi_tmp_path)
    comm.Barrier()
    config = mpi_tmp_path / "own.yaml"
    out = mpi_tmp_path / "mpi.h5"
    assert main(["run", str(config), *(t for s in SETS for t in ("--set", s)), "--out", str(out), "--quiet"]) == 0
    stopped = load_config(config, [*SETS, "rounds=2", f"output={mpi_tmp_path / 'resumed.h5'}"])
    assert Engine(stopped, MPIWorld(), show_progress=False).run() == 0
    resumed = load_config(config, [*SETS, f"output={mpi_tmp_path / 'resumed.h5'}"])
    engine = Engine(resumed, MPIWorld(), resume=True, show_progress=False)
    assert engine.start_round == 2 and engine.run() == 0
    if comm.Get_rank() == 0:
        one = load_config(config, [*SETS, f"output={mpi_tmp_path / 'one.h5'}"])
        assert Engine(one, SerialWorld(), show_progress=False).run() == 0
        p, serial, again = _metrics(out), _metrics(one.output_path), _metrics(resumed.output_path)
        assert set(p) == set(serial) == set(again)
        assert {"rounds/val_acc", "clients/val_acc", "rounds/finetune_val_acc", "rounds/test_acc"} <= set(p)
        assert np.isfinite(p["rounds/val_acc"][[1, 3]]).all() and np.isfinite(p["clients/val_loss"][3]).all()
        for name, value in serial.items():
            np.testing.assert_allclose(p[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
            rows = slice(2, None) if "finetune_" in name else slice(None)  # the stopped run fine-tuned at round 2
            np.testing.assert_array_equal(again[name][rows], p[name][rows], err_msg=name)
        with h5py.File(out) as f:
            assert f.attrs["world_size"] == comm.Get_size()
            np.testing.assert_array_equal(f["partition/val_sizes"][()], [4] * 5)
    comm.Barrier()
