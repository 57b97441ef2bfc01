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

# the opted-in algorithms (tests/test_batched_algorithms.py checks each against the sequential path on one process)
OPTED_IN = ["fedavg", "fedper", "lgfedavg", "fedprox", "local", "fedrep", "ditto", "qsgd", "topk", "signsgd"]
OPTED_IN += ["fetchsgd", "robust", "fedamp"]
SETS = {"data.num_clients": 14, "clients_per_round": 11, "data.partition": "dirichlet", "state_every": 1}


def _states(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        groups = [g for g in ("clients/state", "global/state") if g in f]
        return {f"{g}/{k}": f[g][k][...] for g in groups for k in f[g] if k != "round"}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", OPTED_IN)
def test_batched_results_do_not_depend_on_the_ranks(algorithm, mpi_tmp_path):
    """P ranks with blocks of 3 against one process with blocks of 3 and one process without blocks: the first
    round's per-client results and states are bit for bit the same (a client's result does not depend on its
    block); later rounds differ only by the order of the uplink's float sums."""
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
            states = _states(mpi)
            assert states, "no state recorded"
            for other in (one, seq):
                for name in ("train_loss", "test_acc", "test_loss"):
                    a, b = committed(mpi, "rounds", name), committed(other, "rounds", name)
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
                theirs = _states(other)
                assert set(theirs) == set(states)
                for name, state in states.items():
                    if other == one and name.startswith("clients/"):  # the snapshot after round 1: exact
                        np.testing.assert_array_equal(state[0], theirs[name][0], err_msg=name)
                    np.testing.assert_allclose(state, theirs[name], atol=1e-5, err_msg=name)
    finally:
        MPI.COMM_WORLD.Barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["ditto", "topk"])
def test_a_batched_run_on_p_ranks_resumes_bit_for_bit(algorithm, mpi_tmp_path):
    """Blocks of 3 on P ranks: 2 rounds, then resumed to 4, equal a straight 4-round run on P ranks."""
    world = MPIWorld()

    def engine(name: str, rounds: int, resume: bool = False) -> Engine:
        cfg = tiny_config(mpi_tmp_path / name, algorithm, **SETS, **{"train.client_batch": 3}, rounds=rounds)
        return Engine(cfg, world, resume=resume, show_progress=False)

    assert engine("straight.h5", 4).run() == 0
    assert engine("resumed.h5", 2).run() == 0
    resumed = engine("resumed.h5", 4, resume=True)
    assert resumed.start_round == 2 and resumed.run() == 0
    try:
        if world.rank == 0:
            a, b = mpi_tmp_path / "straight.h5", mpi_tmp_path / "resumed.h5"
            for name in ("train_loss", "test_acc"):
                np.testing.assert_array_equal(committed(b, "rounds", name), committed(a, "rounds", name), name)
            straight = _states(a)
            for name, value in _states(b).items():
                np.testing.assert_array_equal(value, straight[name], err_msg=name)
    finally:
        MPI.COMM_WORLD.Barrier()
