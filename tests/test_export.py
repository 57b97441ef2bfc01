"""``pfl-mpi export --csv``: every CSV value equals the run file's (read independently with h5py)."""

from __future__ import annotations

import csv
import json
import shutil

import h5py
import numpy as np
import pytest

from pfl_mpi.cli import main
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.runtime import Engine
from tests.helpers import tiny_config

FILES = ("rounds.csv", "clients.csv", "comm.csv", "ranks.csv", "partition.csv")


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "run.h5"
    cfg = tiny_config(path, "fedper", rounds=3, eval_every=2, finetune_epochs=1, device="cpu")
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    return path


def _read(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _same(text: str, value) -> bool:
    x = float(text)
    return (np.isnan(x) and np.isnan(value)) or x == float(value)


def _export(src, out) -> dict[str, tuple[list[str], list[list[str]]]]:
    assert main(["export", str(src), "--csv", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    return {name: _read(out / name) for name in FILES}


def test_every_value_equals_the_file(run_file, tmp_path):
    tables = _export(run_file, tmp_path / "csv")
    with h5py.File(run_file, "r", locking=False) as f:
        done = int(f.attrs["rounds_completed"])
        assert done == 3

        header, rows = tables["rounds.csv"]
        assert header[0] == "round" and set(header) == set(f["rounds"])
        assert len(rows) == done
        for j, name in enumerate(header):
            assert all(_same(row[j], f["rounds"][name][t]) for t, row in enumerate(rows)), name
        assert "finetune_test_acc" in header

        metrics = sorted(k for k, v in f["clients"].items() if isinstance(v, h5py.Dataset))
        header, rows = tables["clients.csv"]
        assert header[:2] == ["round", "client"] and sorted(header[2:]) == metrics
        n = f.attrs["num_clients"]
        assert len(rows) == done * n
        for row in rows:
            t, k = int(row[0]), int(row[1])
            for j, name in enumerate(header[2:], start=2):
                assert _same(row[j], f["clients"][name][t, k]), (name, t, k)

        labels, fields = json.loads(f.attrs["comm_labels"]), json.loads(f.attrs["comm_fields"])
        header, rows = tables["comm.csv"]
        assert header == ["round", "rank", "label", *fields]
        assert "cpu_seconds" in fields
        ranks = f["comm/calls"].shape[1]
        assert len(rows) == done * ranks * len(labels)
        for row in rows:
            t, rank, j = int(row[0]), int(row[1]), labels.index(row[2])
            for i, field in enumerate(fields, start=3):
                assert _same(row[i], f["comm"][field][t, rank, j]), (field, row)

        rank_fields = json.loads(f.attrs["rank_fields"])
        header, rows = tables["ranks.csv"]
        assert header == ["round", "rank", *rank_fields] and len(rows) == done * ranks
        for row in rows:
            for i, field in enumerate(rank_fields, start=2):
                assert _same(row[i], f["ranks"][field][int(row[0]), int(row[1])])

        header, rows = tables["partition.csv"]
        hist = f["partition/label_histograms"][()]
        assert header == [
            "client",
            "host_rank",
            "train_size",
            "test_size",
            *(f"label_{c}" for c in range(hist.shape[1])),
        ]
        got = np.array(rows, dtype=np.int64)
        assert np.array_equal(got[:, 0], np.arange(n))
        assert np.array_equal(got[:, 1], f["partition/host_rank"][()])
        assert np.array_equal(got[:, 2], f["partition/train_sizes"][()])
        assert np.array_equal(got[:, 3], f["partition/test_sizes"][()])
        assert np.array_equal(got[:, 4:], hist)


def test_only_committed_rounds_are_exported(run_file, tmp_path):
    partial = tmp_path / "partial.h5"
    shutil.copy(run_file, partial)
    with h5py.File(partial, "r+") as f:
        f.attrs["rounds_completed"] = 2  # as if killed during round 3: its rows are not final
        f.attrs["status"] = "running"
    tables = _export(partial, tmp_path / "csv")
    assert [row[0] for row in tables["rounds.csv"][1]] == ["0", "1"]
    assert {row[0] for row in tables["clients.csv"][1]} == {"0", "1"}
    assert {row[0] for row in tables["comm.csv"][1]} == {"0", "1"}


def test_not_a_run_file_exits_1(tmp_path, capsys):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    assert main(["export", str(bad), "--csv", str(tmp_path / "out")]) == 1
    assert "cannot export" in capsys.readouterr().err


def test_counting_columns_are_integers(run_file, tmp_path):
    """Columns that count (rounds, ranks, clients, calls, bytes, labels) read back as int(); the others keep
    their float text."""
    tables = _export(run_file, tmp_path / "csv")
    expected = {
        "rounds.csv": ["round", "num_sampled", "world_size", "bytes_down", "bytes_up", "bytes_other"],
        "clients.csv": ["round", "client", "participated"],
        "comm.csv": ["round", "rank", "calls", "bytes_sent", "bytes_received"],
        "ranks.csv": ["round", "rank"],
        "partition.csv": ["client", "train_size", "label_0"],
    }
    for name, columns in expected.items():
        header, rows = tables[name]
        assert rows, name
        for column in columns:
            j = header.index(column)
            assert all(str(int(row[j])) == row[j] for row in rows), (name, column)
    header, rows = tables["rounds.csv"]
    assert "." in rows[0][header.index("train_loss")] and "." in rows[1][header.index("test_acc")]
