"""Heterogeneous clients under MPI: the same results as one process, exact bytes for per-client sizes, resume."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from pfl_mpi.comm import LABELS
from pfl_mpi.comm.mpi_world import MPIWorld
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.costmodel.messages import round_messages
from pfl_mpi.runtime import Engine
from pfl_mpi.runtime.placement import place_clients, sample_clients
from pfl_mpi.store.writer import tables_under
from pfl_mpi.wire.plan import make_plan

from ..helpers import committed, tiny_config

sys.path.insert(0, str(Path(__file__).parents[1] / "plugins"))
TWO = "[{hidden: [16]}, {name: cnn2d, cnn2d_fc: [16]}]"  # an MLP and a CNN, embedding size 16 for both


def _config(out: Path, algorithm: str, **overrides):
    sets = {"plugins": "[hetero_echo]", "model.architectures": TWO, "state_every": 1, "finetune_epochs": 1}
    return tiny_config(out, algorithm, **{**sets, **overrides})


def _run(cfg, world, resume: bool = False) -> Engine:
    engine = Engine(cfg, world, resume=resume, show_progress=False)
    assert engine.run() == 0
    return engine


def _assert_same_run(a: Path, b: Path) -> None:
    with h5py.File(a) as f, h5py.File(b) as g:
        assert set(f["rounds"]) == set(g["rounds"])
        names = [n for n in ("train_loss", "test_acc", "test_loss", "finetune_test_acc") if n in f["rounds"]]
    for name in names:
        np.testing.assert_allclose(committed(a, "rounds", name), committed(b, "rounds", name), rtol=1e-5, atol=1e-6)
    with h5py.File(a) as f, h5py.File(b) as g:
        for group in ("clients/state", "global/state"):
            tables = tables_under(f[group])
            assert set(tables) == set(tables_under(g[group]))
            for name, ds in tables.items():
                np.testing.assert_allclose(ds[...], g[group][name][...], atol=1e-5, err_msg=name)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["hetero_echo", "fedproto"])
def test_two_architectures_give_what_one_process_gives(algorithm, mpi_tmp_path):
    world = MPIWorld()
    cfg = _config(mpi_tmp_path / "mpi.h5", algorithm)
    _run(cfg, world)
    if world.rank == 0:
        one = _config(mpi_tmp_path / "one.h5", algorithm)
        _run(one, SerialWorld())
        _assert_same_run(cfg.output_path, one.output_path)
        with h5py.File(cfg.output_path) as f:
            assert set(f["clients/state"]) == {"round", "group0", "group1"}
    MPI.COMM_WORLD.Barrier()


@pytest.mark.mpi(min_size=2)
def test_ragged_bytes_in_the_ledger_equal_the_payload_sizes(mpi_tmp_path):
    """hetero_echo's payloads differ by architecture (down, up, state) and by training samples (up): every
    worker's bytes are the sums of its own clients' declared sizes, nothing padded."""
    world = MPIWorld()
    cfg = _config(mpi_tmp_path / "bytes.h5", "hetero_echo", rounds=3, eval_every=2)
    engine = _run(cfg, world)
    if world.rank == 0:
        algo, sizes = engine.algo, engine.data.train_sizes
        down = np.array([algo.down_numel_of(k) for k in range(10)])
        up = np.array([algo.down_numel_of(k) + sizes[k] for k in range(10)])  # the model, then the labels
        assert len(set(down)) == 2 and len(set(up)) > 2
        with h5py.File(cfg.output_path) as f:
            sent, received = f["comm/bytes_sent"][...], f["comm/bytes_received"][...]
            sampled = f["clients/participated"][...].astype(bool)
            hosts = f["partition/host_rank"][...]
            evaluated = ~np.isnan(f["rounds/test_acc"][...])
        label = LABELS.index
        for t in range(3):
            for rank in range(1, world.size):
                mine = sampled[t] & (hosts == rank)
                assert received[t, rank, label("down")] == 4 * down[mine].sum()
                assert sent[t, rank, label("up")] == 4 * up[mine].sum()
                assert sent[t, rank, label("state")] == 4 * down[mine].sum()  # state = the model
                hosted = 4 * down[hosts == rank].sum() if evaluated[t] else 0
                assert received[t, rank, label("eval_down")] == hosted
            for name in ("up", "state"):
                assert received[t, 0, label(name)] == sent[t, 1:, label(name)].sum()
            assert sent[t, 0, label("down")] == received[t, 1:, label("down")].sum()
        np.testing.assert_array_equal(committed(cfg.output_path, "rounds", "bytes_up"), sent[:, 1:, label("up")].sum(1))

        # the benchmark's prediction of a training round: the same sizes, per worker on average
        workers = world.size - 1
        host = place_clients(sizes, list(range(1, world.size)))
        for t in range(3):
            plan = make_plan(sample_clients(cfg.seed, t, 10, cfg.sampled_per_round), host, world.size)
            by_label = {m.label: m.nbytes for m in round_messages(cfg, world.size, t)}
            assert by_label["down"] == pytest.approx(4 * down[plan.order].sum() / workers)
            assert by_label["up"] == pytest.approx(4 * up[plan.order].sum() / workers)
            assert by_label["state"] == pytest.approx(4 * down[plan.order].sum() / workers)
            assert by_label["down"] == pytest.approx(received[t, 1:, label("down")].mean())
    MPI.COMM_WORLD.Barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["hetero_echo", "fedproto"])
def test_resume_on_more_ranks_restores_every_group(algorithm, mpi_tmp_path):
    """Two rounds in one process, then the rest on every rank of the job: per-group client states go back to
    their (new) hosts and the run ends as a straight one-process run."""
    world = MPIWorld()
    path = mpi_tmp_path / "resumed.h5"
    once = {"finetune_epochs": 0}  # fine-tuning after the first part's last round would not be in a straight run
    if world.rank == 0:
        _run(_config(path, algorithm, rounds=2, **once), SerialWorld())
    MPI.COMM_WORLD.Barrier()
    engine = _run(_config(path, algorithm, rounds=4, **once), world, resume=True)
    assert engine.start_round == 2
    if world.rank == 0:
        straight = _config(mpi_tmp_path / "straight.h5", algorithm, rounds=4, **once)
        _run(straight, SerialWorld())
        _assert_same_run(path, straight.output_path)
    MPI.COMM_WORLD.Barrier()
