"""train.optimizer_state: keep under MPI: FedPer with Adam, its clients' moments kept as client state, gives
what one process gives; stopped after 2 rounds and resumed to 4, it equals the straight 4-round run bit for
bit (the moments travel with the checkpoint to whichever rank hosts the client)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from pfl_mpi.cli import main
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.config import load_config
from pfl_mpi.runtime import Engine

from ..helpers import committed

COMM = MPI.COMM_WORLD
SETS = [
    "name=keep",
    "seed=2",
    "clients_per_round=6",
    "state_every=1",
    "data.name=digits",
    "data.num_clients=10",
    "data.partition=shards",
    "data.classes_per_client=2",
    "model.name=mlp",
    "model.hidden=[16]",
    "train.optimizer=adam",
    "train.lr=0.01",
    "train.batch_size=8",
    "train.optimizer_state=keep",
    "algorithm.name=fedper",
]


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    path = Path(COMM.bcast(tempfile.mkdtemp(prefix="pfl-keep-") if COMM.Get_rank() == 0 else None, root=0))
    yield path
    COMM.Barrier()
    if COMM.Get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


def _run(*args: str) -> None:
    assert main(["run", *args, "--quiet"]) == 0


def _check(folder: Path, straight: Path, resumed: Path) -> None:
    one = load_config(None, [*SETS, "rounds=4", f"output={folder / 'one.h5'}"])
    assert Engine(one, SerialWorld(), show_progress=False).run() == 0
    for metric in ("train_loss", "test_loss", "test_acc"):
        a = committed(straight, "rounds", metric)
        np.testing.assert_array_equal(committed(resumed, "rounds", metric), a, err_msg=metric)
        np.testing.assert_allclose(a, committed(one.output_path, "rounds", metric), rtol=1e-5, err_msg=metric)
    with h5py.File(straight) as fa, h5py.File(resumed) as fb, h5py.File(one.output_path) as fc:
        kept = fa["clients/state/optimizer_state"][-1]
        assert np.abs(kept).sum() > 0
        np.testing.assert_array_equal(fb["clients/state/optimizer_state"][-1], kept)
        np.testing.assert_allclose(fc["clients/state/optimizer_state"][-1], kept, rtol=1e-4, atol=1e-7)


@pytest.mark.mpi(min_size=2)
def test_kept_optimizer_state_resumes_exactly_under_mpi(folder: Path) -> None:
    size = COMM.Get_size()
    straight, resumed = folder / f"straight-{size}.h5", folder / f"resumed-{size}.h5"
    sets = [token for s in SETS for token in ("--set", s)]
    _run(*sets, "--set", "rounds=4", "--out", str(straight))
    _run(*sets, "--set", "rounds=2", "--out", str(resumed))
    _run("--resume", str(resumed), "--set", "rounds=4")
    failure = None
    if COMM.Get_rank() == 0:
        try:
            _check(folder, straight, resumed)
        except AssertionError as err:  # every rank learns it, so that none waits in a collective
            failure = f"{type(err).__name__}: {err}"
    failure = COMM.bcast(failure, root=0)
    assert failure is None, failure
