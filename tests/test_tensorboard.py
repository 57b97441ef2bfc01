"""``pfl-mpi export --tensorboard``: the event files, read back with TensorBoard's EventAccumulator, hold
every /rounds metric, the bytes and seconds per message label and the per-client histograms of the file."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, SCALARS, EventAccumulator

from pfl_mpi.cli import main
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.report.tensorboard import scalar_tag
from pfl_mpi.runtime import Engine
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    """A fedper run with fine-tuning; non-zero bytes per label written in as a multi-rank job would, and a
    ``protocol_bytes_*`` field such as a later ledger may add."""
    path = tmp_path_factory.mktemp("tb") / "run.h5"
    cfg = tiny_config(path, "fedper", rounds=3, eval_every=2, finetune_epochs=1, device="cpu")
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    with h5py.File(path, "r+") as f:
        rng = np.random.default_rng(1)
        for name in ("bytes_sent", "bytes_received"):
            f["comm"][name][...] = rng.integers(1, 10_000, f["comm"][name].shape)
        f["rounds"].create_dataset("protocol_bytes_mpi", data=rng.integers(1, 10_000, 3).astype(np.float64))
    return path


def _load(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={SCALARS: 0, HISTOGRAMS: 0})
    acc.Reload()
    return acc


def test_scalars_and_histograms_equal_the_file(run_file, tmp_path, capsys):
    assert main(["export", str(run_file), "--tensorboard", str(tmp_path / "tb")]) == 0
    logdir = tmp_path / "tb" / "run"
    assert capsys.readouterr().out.strip() == f"wrote {logdir}"
    acc = _load(logdir)
    tags = acc.Tags()
    with h5py.File(run_file, "r", locking=False) as f:
        done = int(f.attrs["rounds_completed"])
        rounds = {k: v[:done] for k, v in f["rounds"].items()}
        clients = {k: v[:done] for k, v in f["clients"].items() if isinstance(v, h5py.Dataset)}
        labels = json.loads(f.attrs["comm_labels"])
        sent, received, seconds = (f["comm"][k][:done] for k in ("bytes_sent", "bytes_received", "seconds"))

    assert "bytes/protocol_bytes_mpi" in tags["scalars"] and "accuracy/test_acc" in tags["scalars"]
    for name, values in rounds.items():
        if name == "round":
            continue
        events = acc.Scalars(scalar_tag(name))
        finite = np.flatnonzero(np.isfinite(values))
        assert [e.step for e in events] == list(finite + 1), name  # 1-based rounds; NaN rounds left out
        np.testing.assert_array_equal([e.value for e in events], values[finite].astype(np.float32), err_msg=name)
    assert [e.step for e in acc.Scalars("accuracy/test_acc")] == [2, 3]  # evaluated every 2 rounds and the last

    for j, label in enumerate(labels):
        expected = {"down": received[:, 1:, j].sum(axis=1), "up": sent[:, 1:, j].sum(axis=1)}.get(
            label, sent[:, :, j].sum(axis=1)
        )
        got = [e.value for e in acc.Scalars(f"comm_bytes/{label}")]
        np.testing.assert_array_equal(got, expected.astype(np.float32), err_msg=label)
        np.testing.assert_allclose([e.value for e in acc.Scalars(f"comm_seconds/{label}")], seconds[:, 0, j], rtol=1e-6)

    assert "clients/participated" not in tags["histograms"]
    for name in ("test_acc", "train_loss", "finetune_test_acc"):
        events = acc.Histograms(f"clients/{name}")
        rows = [t for t in range(done) if np.isfinite(clients[name][t]).any()]
        assert [e.step for e in events] == [t + 1 for t in rows], name
        for event, t in zip(events, rows, strict=True):
            x = clients[name][t][np.isfinite(clients[name][t])].astype(np.float64)
            h = event.histogram_value
            assert (h.num, h.min, h.max) == (len(x), x.min(), x.max())
            assert h.sum == pytest.approx(x.sum()) and h.sum_squares == pytest.approx((x * x).sum())
            assert sum(h.bucket) == len(x) and h.bucket_limit[-1] == pytest.approx(x.max())


def test_a_second_export_replaces_the_first_and_csv_goes_along(run_file, tmp_path):
    out = tmp_path / "tb"
    assert main(["export", str(run_file), "--tensorboard", str(out)]) == 0
    assert main(["export", str(run_file), "--tensorboard", str(out), "--csv", str(tmp_path / "csv")]) == 0
    assert len(list((out / "run").glob("events.out.tfevents.*"))) == 1
    assert [e.step for e in _load(out / "run").Scalars("loss/train_loss")] == [1, 2, 3]
    assert (tmp_path / "csv" / "rounds.csv").exists()


def test_only_committed_rounds(run_file, tmp_path):
    partial = tmp_path / "partial.h5"
    shutil.copy(run_file, partial)
    with h5py.File(partial, "r+") as f:
        f.attrs["rounds_completed"] = 2
    assert main(["export", str(partial), "--tensorboard", str(tmp_path / "tb")]) == 0
    assert [e.step for e in _load(tmp_path / "tb" / "partial").Scalars("loss/train_loss")] == [1, 2]


def test_export_without_a_destination_exits_2(run_file, capsys):
    assert main(["export", str(run_file)]) == 2
    assert capsys.readouterr().err.strip() == "pfl-mpi: export: give --csv DIR, --tensorboard DIR and/or --model DIR"
