"""Under MPI: clock offsets, waiting in the ledger, the sweep, and ``pfl-mpi bench comm`` end to end."""

from __future__ import annotations

import time

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from pfl_mpi.comm import FIELDS, LABELS
from pfl_mpi.comm.ledger import unpack_rows
from pfl_mpi.comm.mpi_world import MPIWorld
from pfl_mpi.comm.sweep import NOTICE_OPS, OPS, Sweep

LATE = 0.3  # seconds the last rank sleeps before entering


@pytest.mark.mpi(min_size=2)
def test_clocks_of_one_host_agree():
    world = MPIWorld()
    if world.rank == 0:
        assert world.clock_offset == 0.0 and world.clock_error == 0.0
    if len(set(world.hosts)) == 1:  # one host: one monotonic clock, so the estimate is near 0
        assert abs(world.clock_offset) < 0.05 and 0.0 <= world.clock_error < 0.05


@pytest.mark.mpi(min_size=2)
def test_a_late_rank_makes_the_root_wait():
    """The last rank sleeps before a Reduce: rank 0, which needs its data, records about that long as
    waiting; the late rank itself almost none. (Other senders may leave a small Reduce or Bcast early:
    MPI's eager protocol does not wait for the receiver, and waiting never exceeds a call's seconds.)"""
    world = MPIWorld()
    last = world.size - 1
    world.barrier()
    if world.rank == last:
        time.sleep(LATE)
    world.reduce_sum(np.ones(4), "up")
    world.broadcast(np.zeros(4), "control")  # nobody late here
    table = unpack_rows(world.ledger.as_row()[None])[0]
    rows = world.gather_rows(world.ledger.as_row(), "ledger")  # as the engine does, after packing
    world.ledger.reset()
    # every collective is done: an assertion that fails on one rank cannot leave the others waiting in one
    waiting = table[:, FIELDS.index("waiting")]
    seconds = table[:, FIELDS.index("seconds")]
    assert np.all(waiting >= 0) and np.all(waiting <= seconds + 1e-12)
    up = LABELS.index("up")
    if world.rank == 0:
        assert 0.5 * LATE < waiting[up] <= seconds[up]
    if world.rank == last:
        assert waiting[up] < 0.5 * LATE
    if world.rank in (0, last):  # a sender that left the Reduce early does wait in the Bcast, for rank 0
        assert waiting[LABELS.index("control")] < 0.5 * LATE
    if world.rank == 0:
        everyone = unpack_rows(rows)[:, up, FIELDS.index("waiting")]
        assert everyone[0] > 0.5 * LATE and everyone[last] < 0.5 * LATE
    assert len(world.ledger.entries) == 1  # the gather's own entry, resolved with the next round


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("wait", ["polled", "blocking"])
def test_sweep_times_every_operation(wait):
    world = MPIWorld(wait=wait)
    times = Sweep(world).run([8, 4096], repeats=2)
    if world.rank == 0:
        assert set(times) == set(OPS)
        for op, t in times.items():
            assert t.shape == (2, 2) and np.all(t > 0) and np.all(np.isfinite(t)), op
    else:
        assert times == {}


@pytest.mark.mpi(min_size=2)
def test_notice_times_a_late_entry():
    """Each collective once per repeat with one rank entering late: every time is positive, finite and
    recorded from the late rank's entry (so it never includes the late rank's own sleep)."""
    world = MPIWorld(poll_max=2e-3)
    notice = Sweep(world).notice(repeats=3)
    if world.rank == 0:
        assert set(notice) == set(NOTICE_OPS)
        for op, t in notice.items():
            assert t.shape == (3,) and np.all(t > 0) and np.all(np.isfinite(t)), op
    else:
        assert notice == {}


@pytest.mark.mpi(min_size=2)
def test_bench_comm_command(mpi_tmp_path, capsys):
    """The command: table, fit, a config's predicted and measured round, the file, the plot, info."""
    from pfl_mpi.cli import main

    path = MPI.COMM_WORLD.bcast(str(mpi_tmp_path), root=0)
    config = f"{path}/tiny.yaml"
    if world_rank() == 0:
        with open(config, "w") as f:
            f.write(
                "name: tiny\nclients_per_round: 4\n"
                "data: {name: digits, num_clients: 10, partition: shards, classes_per_client: 2}\n"
                "model: {name: mlp, hidden: [8]}\ntrain: {local_epochs: 1, batch_size: 16}\n"
                "algorithm: {name: fedper}\n"
            )
    MPI.COMM_WORLD.Barrier()
    out = f"{path}/bench.h5"
    args = ["bench", "comm", "--sizes", "8", "1K", "64K", "--repeats", "2", "--rounds", "3"]
    assert main([*args, "--out", out, "--plot", f"{path}/bench.png", "--config", config]) == 0
    if world_rank() == 0:
        printed = capsys.readouterr().out
        assert "| size | Bcast us |" in printed and "| Reduce |" in printed
        assert "**tiny, fedper" in printed and "| down + up |" in printed
        assert "| wake ms = notice - fit |" in printed and "measured / predicted, whole round:" in printed
        with h5py.File(out) as f:
            assert f.attrs["ranks"] == MPI.COMM_WORLD.Get_size()
            assert set(f["sweep"]) == set(OPS)
            assert f["sweep/Bcast/repeats"].shape == (3, 2)
            assert set(f["notice"]) == set(NOTICE_OPS) and f["notice/Reduce"].shape == (2,)
            assert f["notice/Reduce"].attrs["wake"] >= 0
        run = f"{path}/bench-tiny.h5"
        with h5py.File(run) as f:
            waiting = f["comm/waiting"][...]
            seconds = f["comm/seconds"][...]
        assert np.all(waiting >= 0) and np.all(waiting <= seconds + 1e-9)
        assert waiting[:, 0, LABELS.index("metrics")].sum() > 0  # the server waits for training
        assert main(["info", run]) == 0
        assert "| metrics | 3 |" in capsys.readouterr().out
        from pfl_mpi.costmodel.report import read_h5

        assert "tiny" in read_h5(out)[2]["predictions"]
    MPI.COMM_WORLD.Barrier()


def world_rank() -> int:
    return MPI.COMM_WORLD.Get_rank()
