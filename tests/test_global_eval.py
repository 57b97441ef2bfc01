"""Algorithms with a global model beside the personal ones record that model's accuracy too."""

from __future__ import annotations

import h5py
import numpy as np

from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.runtime import Engine

from .helpers import committed, tiny_config


def test_ditto_global_accuracy_is_fedavgs_and_personal_accuracy_is_its_own(tmp_path):
    """Ditto's w is FedAvg's exactly, so its global accuracy equals FedAvg's test accuracy."""
    for name in ("ditto", "fedavg"):
        cfg = tiny_config(tmp_path / f"{name}.h5", name, rounds=3, finetune_epochs=1)
        assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    ditto, fedavg = tmp_path / "ditto.h5", tmp_path / "fedavg.h5"
    np.testing.assert_array_equal(
        committed(ditto, "rounds", "global_test_acc"), committed(fedavg, "rounds", "test_acc")
    )
    np.testing.assert_array_equal(
        committed(ditto, "clients", "global_test_acc"), committed(fedavg, "clients", "test_acc")
    )
    assert not np.allclose(committed(ditto, "rounds", "test_acc"), committed(ditto, "rounds", "global_test_acc"))
    with h5py.File(fedavg) as f:  # FedAvg has one model: nothing extra is recorded
        assert "global_test_acc" not in f["rounds"] and "global_test_acc" not in f["clients"]
    with h5py.File(ditto) as f:  # fine-tuning columns and global columns side by side, last round
        assert np.isfinite(f["rounds/finetune_test_acc"][-1]) and np.isfinite(f["rounds/global_test_acc"][-1])


def test_perfedavg_global_accuracy_is_the_model_before_personalisation(tmp_path):
    """With no personalisation step at evaluation, the personal and the global accuracy coincide."""
    cfg = tiny_config(tmp_path / "p.h5", "perfedavg", rounds=2, **{"algorithm.eval_steps": 0})
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    np.testing.assert_array_equal(
        committed(cfg.output_path, "clients", "global_test_acc"), committed(cfg.output_path, "clients", "test_acc")
    )
    cfg = tiny_config(tmp_path / "q.h5", "perfedavg", rounds=2, **{"algorithm.eval_steps": 1})
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    assert not np.allclose(
        committed(cfg.output_path, "clients", "global_test_acc"), committed(cfg.output_path, "clients", "test_acc")
    )
