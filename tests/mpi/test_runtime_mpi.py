"""The runtime under MPI: results equal a single process, and only the algorithm's messages move."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from pfl_mpi.comm import FIELDS, LABELS
from pfl_mpi.comm.mpi_world import MPIWorld
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.runtime import Engine

from ..helpers import committed, tiny_config


def _run(cfg, world) -> int:
    return Engine(cfg, world, show_progress=False).run()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["fedavg", "fedper", "local"])
def test_same_results_as_one_process(algorithm, mpi_tmp_path):
    """Placement invariance: P ranks and one process give the same metrics and states."""
    world = MPIWorld()
    assert _run(tiny_config(mpi_tmp_path / "mpi.h5", algorithm), world) == 0
    if world.rank == 0:
        assert _run(tiny_config(mpi_tmp_path / "one.h5", algorithm), SerialWorld()) == 0
        for name in ("train_loss", "test_acc", "test_loss"):
            np.testing.assert_allclose(
                committed(mpi_tmp_path / "mpi.h5", "rounds", name),
                committed(mpi_tmp_path / "one.h5", "rounds", name),
                rtol=1e-5,
                atol=1e-6,
            )
        with h5py.File(mpi_tmp_path / "mpi.h5") as a, h5py.File(mpi_tmp_path / "one.h5") as b:
            for name in a["clients/state"]:
                np.testing.assert_allclose(a["clients/state"][name][...], b["clients/state"][name][...], atol=1e-5)
            for name in a["global/state"]:
                np.testing.assert_allclose(a["global/state"][name][...], b["global/state"][name][...], atol=1e-5)
    MPI.COMM_WORLD.Barrier()


@pytest.mark.mpi(min_size=2)
def test_fedper_moves_only_the_base(mpi_tmp_path):
    """FedPer's heads stay on their clients: down and up carry exactly the base parameters."""
    world = MPIWorld()
    cfg = tiny_config(mpi_tmp_path / "fedper.h5", "fedper")
    engine = Engine(cfg, world, show_progress=False)
    base = sum(p.numel() for n, p in engine.algo.setup.model.named_parameters() if n.startswith("base."))
    head = sum(p.numel() for n, p in engine.algo.setup.model.named_parameters() if n.startswith("head."))
    assert engine.run() == 0
    if world.rank == 0:
        with h5py.File(cfg.output_path) as f:
            received = f["comm/bytes_received"][...]  # [round, rank, label]
            sent = f["comm/bytes_sent"][...]
            calls = f["comm/calls"][...]
            heads = f["clients/state/personal"][-1]
        down, up = LABELS.index("down"), LABELS.index("up")
        workers = range(1, world.size)
        # every worker receives the base once per round, and sends base + one weight once per round
        assert np.all(calls[:, workers, down] == 1)
        assert np.all(received[:, workers, down] == 4 * base)
        assert np.all(sent[:, workers, up] == 4 * (base + 1))
        assert committed(cfg.output_path, "rounds", "bytes_down").tolist() == [4 * base * (world.size - 1)] * 3
        assert heads.shape == (10, head)
        trained = heads[np.any(heads != heads[0], axis=1) | (np.arange(10) == 0)]
        assert len(np.unique(trained.round(6), axis=0)) > 1, "personal heads should differ between clients"
    MPI.COMM_WORLD.Barrier()


@pytest.mark.mpi(min_size=2)
def test_ledger_bytes_equal_payload_sizes(mpi_tmp_path):
    """The bytes recorded for each message equal the sizes of the buffers that were sent."""
    world = MPIWorld()
    cfg = tiny_config(mpi_tmp_path / "fedavg.h5", "fedavg", rounds=2)
    engine = Engine(cfg, world, show_progress=False)
    numel = engine.algo.down_numel()
    assert engine.run() == 0
    if world.rank == 0:
        with h5py.File(cfg.output_path) as f:
            table = np.stack([f["comm"][name][...] for name in FIELDS], axis=-1)  # [round, rank, label, field]
            hosts = f["partition/host_rank"][...]
        sent, received = FIELDS.index("bytes_sent"), FIELDS.index("bytes_received")
        p = world.size
        assert np.all(table[:, 0, LABELS.index("down"), sent] == 4 * numel * (p - 1))
        assert np.all(table[:, 0, LABELS.index("up"), received] == 4 * (numel + 1) * (p - 1))
        # evaluation round: metrics rows of 4 float64 per hosted client
        for rank in range(1, p):
            assert np.all(table[:, rank, LABELS.index("eval_metrics"), sent] == 8 * 4 * np.sum(hosts == rank))
        # what rank 0 received equals what the workers sent, message by message
        for label in ("up", "metrics", "eval_metrics"):
            i = LABELS.index(label)
            np.testing.assert_array_equal(table[:, 0, i, received], table[:, 1:, i, sent].sum(axis=1))
    MPI.COMM_WORLD.Barrier()


@pytest.mark.mpi(min_size=2)
def test_fedavg_equals_sequential_reference(mpi_tmp_path):
    """FedAvg on P ranks equals FedAvg written plainly in one process (tests/reference.py)."""
    from ..reference import fedavg_reference

    world = MPIWorld()
    cfg = tiny_config(mpi_tmp_path / "ref.h5", "fedavg", rounds=3, state_every=1)
    assert _run(cfg, world) == 0
    if world.rank == 0:
        with h5py.File(cfg.output_path) as f:
            states = f["global/state/shared"][...]
        assert states.shape[0] == 3
        np.testing.assert_allclose(states[-1], fedavg_reference(cfg, 3).numpy(), atol=2e-5)
        np.testing.assert_allclose(states[0], fedavg_reference(cfg, 1).numpy(), atol=2e-5)
        assert not np.allclose(states[0], states[-1])
    MPI.COMM_WORLD.Barrier()


@pytest.mark.mpi(min_size=2)
def test_scatter_and_gather_paths_equal_bcast_and_reduce(mpi_tmp_path):
    """FedAvg through Scatterv/Gatherv equals FedAvg through Bcast/Reduce; their bytes scale with clients."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "plugins"))
    world = MPIWorld()
    plugin = {"plugins": "[gathered_fedavg]"}
    assert _run(tiny_config(mpi_tmp_path / "reduce.h5", "fedavg", **plugin), world) == 0
    cfg = tiny_config(mpi_tmp_path / "gather.h5", "gathered_fedavg", **plugin)
    engine = Engine(cfg, world, show_progress=False)
    numel = engine.algo.down_numel()
    assert engine.run() == 0
    if world.rank == 0:
        for name in ("train_loss", "test_acc"):
            np.testing.assert_allclose(
                committed(cfg.output_path, "rounds", name),
                committed(mpi_tmp_path / "reduce.h5", "rounds", name),
                rtol=1e-5,
                atol=1e-6,
            )
        with h5py.File(cfg.output_path) as f:
            received = f["comm/bytes_received"][...]
            sent = f["comm/bytes_sent"][...]
            sampled = f["clients/participated"][...].astype(bool)
            hosts = f["partition/host_rank"][...]
        for t in range(3):
            for rank in range(1, world.size):
                mine = int(np.sum(sampled[t] & (hosts == rank)))
                assert received[t, rank, LABELS.index("down")] == 4 * numel * mine
                assert sent[t, rank, LABELS.index("up")] == 4 * numel * mine
                # evaluation scatters every hosted client's payload
                assert received[t, rank, LABELS.index("eval_down")] == 4 * numel * int(np.sum(hosts == rank))
    MPI.COMM_WORLD.Barrier()


@pytest.mark.mpi(min_size=2)
def test_blocking_wait_changes_how_ranks_wait_not_what_moves(mpi_tmp_path):
    """comm.wait = blocking completes calls with MPI's own wait: the same metrics and bytes as polled."""
    polled = tiny_config(mpi_tmp_path / "polled.h5", "fedavg")
    blocking = tiny_config(mpi_tmp_path / "blocking.h5", "fedavg", **{"comm.wait": "blocking"})
    assert _run(polled, MPIWorld(wait=polled.comm.wait)) == 0
    assert _run(blocking, MPIWorld(wait=blocking.comm.wait)) == 0
    if MPI.COMM_WORLD.Get_rank() == 0:
        for name in ("train_loss", "test_acc"):
            np.testing.assert_array_equal(
                committed(polled.output_path, "rounds", name), committed(blocking.output_path, "rounds", name)
            )
        with h5py.File(polled.output_path) as a, h5py.File(blocking.output_path) as b:
            for field in ("calls", "bytes_sent", "bytes_received"):
                np.testing.assert_array_equal(a[f"comm/{field}"][...], b[f"comm/{field}"][...])
    MPI.COMM_WORLD.Barrier()
