"""Safety under MPI: ranks agree on a failure before the run starts (no rank waits for ever), a failed write
of the run file stops every rank, and the resume ends exactly as an unbroken run."""

from __future__ import annotations

import argparse
import errno
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from pfl_mpi.comm.mpi_world import MPIWorld
from pfl_mpi.commands import run as run_command
from pfl_mpi.errors import EXIT_CONFIG, EXIT_WRITE, ConfigError
from pfl_mpi.runtime import Engine
from pfl_mpi.runtime.cluster import Stopper
from pfl_mpi.store.lock import lock_path
from pfl_mpi.store.writer import partial_path

from ..helpers import tiny_config


@pytest.mark.mpi(min_size=2)
def test_agree_tells_every_rank_the_lowest_failing_rank():
    world = MPIWorld()
    assert world.agree(None) is None
    last = world.size - 1
    assert world.agree("late" if world.rank == last else None) == (last, "late")
    assert world.agree(f"rank {world.rank}" if world.rank else None) == (1, "rank 1")


@pytest.mark.mpi(min_size=2)
def test_a_config_error_on_one_worker_ends_every_rank_with_exit_2(mpi_tmp_path, monkeypatch, capsys):
    """As a plugin missing on one node: rank 1 fails its checks, rank 0 passes them and holds the lock;
    both leave with exit 2, rank 0 prints the worker's line, and the lock is given back."""
    world = MPIWorld()
    out = mpi_tmp_path / "agree.h5"
    cfg = tiny_config(out, device="cpu")

    def check(cfg, done, args, server, worker):
        if world.rank == 1:
            raise ConfigError("plugins", "cannot import 'mine': No module named 'mine'")

    monkeypatch.setattr(run_command, "_check_start", check)
    monkeypatch.setattr(run_command, "_resolve_run_config", lambda args: (cfg, None))
    args = argparse.Namespace(overwrite=False, quiet=True)
    code = run_command._run_ranks(args, world, None, Stopper(world))
    assert code == EXIT_CONFIG
    err = capsys.readouterr().err
    if world.rank == 0:
        assert err.strip() == (
            "pfl-mpi: config error: plugins: cannot import 'mine': No module named 'mine' "
            f"(rank 1 of {world.size}, host {world.hosts[1]})"
        )
        assert not lock_path(out).exists() and not out.exists()
    MPI.COMM_WORLD.Barrier()


@pytest.mark.mpi(min_size=2)
def test_a_failed_write_stops_every_rank_and_the_resume_is_exact(mpi_tmp_path, monkeypatch):
    """Rank 0's flush of round 3's data fails (ENOSPC): every rank's engine returns EXIT_WRITE, the file
    keeps 2 committed rounds; resumed on the same ranks it ends as the unbroken run."""
    world = MPIWorld()
    broken, full = mpi_tmp_path / "broken.h5", mpi_tmp_path / "full.h5"
    real_flush, failed = h5py.File.flush, []

    def flaky(self):
        mine = Path(self.filename) in (broken, partial_path(broken))
        if mine and not failed and self.attrs.get("rounds_completed") == 2 and self["rounds/round"][2] == 2:
            failed.append(True)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_flush(self)

    monkeypatch.setattr(h5py.File, "flush", flaky)
    engine = Engine(tiny_config(broken, rounds=5, device="cpu"), world, show_progress=False)
    stopper = Stopper(world)
    stopper.watch(engine)
    assert engine.run() == EXIT_WRITE
    if world.rank == 0:
        assert failed and "keeps at least 2 committed round(s)" in str(stopper.failure)
        engine.writer.f.close()
        with h5py.File(broken, "r", locking=False) as f:
            assert f.attrs["rounds_completed"] == 2
    monkeypatch.setattr(h5py.File, "flush", real_flush)
    MPI.COMM_WORLD.Barrier()
    resumed = Engine(tiny_config(broken, rounds=5, device="cpu"), world, resume=True, show_progress=False)
    assert resumed.start_round == 2
    assert resumed.run() == 0
    assert Engine(tiny_config(full, rounds=5, device="cpu"), world, show_progress=False).run() == 0
    if world.rank == 0:
        with h5py.File(broken, "r", locking=False) as a, h5py.File(full, "r", locking=False) as b:
            assert a.attrs["rounds_completed"] == b.attrs["rounds_completed"] == 5
            for name in ("train_loss", "test_acc", "test_loss"):
                np.testing.assert_array_equal(a["rounds"][name][:], b["rounds"][name][:], err_msg=name)
            for name in a["global/state"]:
                np.testing.assert_array_equal(a["global/state"][name][-1], b["global/state"][name][-1])
    MPI.COMM_WORLD.Barrier()
