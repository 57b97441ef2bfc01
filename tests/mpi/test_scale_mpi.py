"""Scale under MPI: a client's data exists only on its host, and resume moves client states in blocks."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from pfl_mpi.comm import LABELS
from pfl_mpi.comm.mpi_world import MPIWorld
from pfl_mpi.data import load_federated, synthetic
from pfl_mpi.runtime import Engine
from pfl_mpi.store import writer as writer_module

from ..helpers import committed, tiny_config


@pytest.mark.mpi(min_size=2)
def test_synthetic_clients_are_generated_only_on_their_host(mpi_tmp_path, monkeypatch):
    """No rank generates a client it does not host (the server none), yet the file's label histograms
    equal every client's, generated here independently."""
    generated: list[int] = []
    generate = synthetic.generate

    def counting(cfg, seed, k, n):
        generated.append(int(k))
        return generate(cfg, seed, k, n)

    monkeypatch.setattr(synthetic, "generate", counting)
    world = MPIWorld()
    synthetic_data = {"data.name": "synthetic", "data.num_clients": 30, "data.partition": "null"}
    cfg = tiny_config(mpi_tmp_path / "syn.h5", "fedper", **synthetic_data, **{"data.synthetic.max_samples": 60})
    engine = Engine(cfg, world, show_progress=False)
    assert sorted(generated) == sorted(engine.hosted)
    if world.is_server:
        assert generated == []
    assert engine.run() == 0
    if world.is_server:
        with h5py.File(cfg.output_path) as f:
            stored = f["partition/label_histograms"][...]
        np.testing.assert_array_equal(stored, load_federated(cfg.data, cfg.seed).label_histograms())
    MPI.COMM_WORLD.Barrier()


@pytest.mark.mpi(min_size=2)
def test_resume_scatters_states_in_blocks_and_matches_a_straight_run(mpi_tmp_path, monkeypatch):
    """With blocks of 3 clients, resume sends the 10 client states in 4 Scatterv calls, and the resumed run
    ends with the same metrics and personal heads as an unbroken one."""
    world = MPIWorld()
    straight = tiny_config(mpi_tmp_path / "straight.h5", "fedper", rounds=4)
    engine = Engine(straight, world, show_progress=False)
    head = sum(p.numel() for n, p in engine.algo.setup.model.named_parameters() if n.startswith("head."))
    assert engine.run() == 0
    monkeypatch.setattr(writer_module, "_BLOCK_BYTES", 3 * 4 * head)
    assert writer_module.block_rows(head) == 3
    resumed = tiny_config(mpi_tmp_path / "resumed.h5", "fedper", rounds=2)
    assert Engine(resumed, world, show_progress=False).run() == 0
    resumed = tiny_config(mpi_tmp_path / "resumed.h5", "fedper", rounds=4)
    assert Engine(resumed, world, resume=True, show_progress=False).run() == 0
    if world.is_server:
        for name in ("train_loss", "test_acc", "test_loss"):
            np.testing.assert_array_equal(
                committed(resumed.output_path, "rounds", name), committed(straight.output_path, "rounds", name)
            )
        with h5py.File(straight.output_path) as a, h5py.File(resumed.output_path) as b:
            np.testing.assert_array_equal(a["clients/state/personal"][-1], b["clients/state/personal"][-1])
            for slot in ("slot0", "slot1"):  # rounds 2 and 3: whole tables, carried over and updated
                key = f"checkpoint/{slot}/clients/personal"
                np.testing.assert_array_equal(a[key][...], b[key][...])
            calls = b["comm/calls"][2, :, LABELS.index("restore")]  # counted in the first round run
        assert calls.tolist() == [1 + math.ceil(10 / 3)] * world.size  # the Bcast of the round, then the blocks
    MPI.COMM_WORLD.Barrier()
