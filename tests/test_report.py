"""``pfl-mpi report``: every promised file, and the numbers of report.md equal the run files'."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import matplotlib.image
import numpy as np
import pytest

from pfl_mpi.cli import main
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.report.build import FIGURES
from pfl_mpi.report.load import bytes_by_label, load_run, server_seconds_by_label
from pfl_mpi.runtime import Engine
from tests.helpers import tiny_config

PNGS = [file for file, _, _ in FIGURES]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A personalised run with fine-tuning and a FedAvg run, each in one process; a copy of the
    second stands in for a multi-rank job's file: distinct non-zero byte counts in /rounds and /comm."""
    tmp = tmp_path_factory.mktemp("report")
    personal, shared = tmp / "personal.h5", tmp / "shared.h5"
    cfg = tiny_config(personal, "fedper", name="personal", rounds=4, eval_every=2, finetune_epochs=1, device="cpu")
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    cfg = tiny_config(shared, "fedavg", name="shared", rounds=3, device="cpu")
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    with h5py.File(shared, "r+") as f:
        rng = np.random.default_rng(0)
        for name in ("bytes_sent", "bytes_received"):
            f["comm"][name][...] = rng.integers(1, 10_000, f["comm"][name].shape)
        for name in ("bytes_down", "bytes_up", "bytes_other"):
            f["rounds"][name][...] = rng.integers(1, 10_000, f["rounds"][name].shape)
    return personal, shared


def _table(report: str) -> list[dict[str, str]]:
    lines = report.split("## Comparison", 1)[1].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return rows


def _expected(path: Path) -> dict[str, float]:
    """The table's numbers, computed straight from the file with h5py."""
    with h5py.File(path, "r", locking=False) as f:
        done = int(f.attrs["rounds_completed"])
        r = {k: v[:done] for k, v in f["rounds"].items()}
        name, algorithm, status = (f.attrs[k] for k in ("name", "algorithm", "status"))
    evaluated = np.flatnonzero(~np.isnan(r["test_acc"]))
    out = {
        "run": name,
        "algorithm": algorithm,
        "status": status,
        "rounds": done,
        "final test acc": r["test_acc"][evaluated[-1]],
        "best test acc": r["test_acc"][evaluated].max(),
        "best at round": evaluated[np.argmax(r["test_acc"][evaluated])] + 1,
        "final client mean acc": r["test_acc_mean"][evaluated[-1]],
        "bytes down+up": r["bytes_down"].sum() + r["bytes_up"].sum(),
        "bytes total": r["bytes_down"].sum() + r["bytes_up"].sum() + r["bytes_other"].sum(),
        "wall time (s)": r["seconds_wall"].sum(),
    }
    if "finetune_test_acc" in r:
        out["fine-tuned test acc"] = r["finetune_test_acc"][-1]
    return out


def test_report_of_two_runs_writes_every_file_and_the_files_numbers(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*PNGS, "report.md"])
    assert capsys.readouterr().out.count("wrote ") == len(PNGS) + 1
    for png in PNGS:
        image = matplotlib.image.imread(out / png)
        assert image.shape[0] >= 300 and image.shape[1] >= 800, png
        assert (out / png).stat().st_size < 150_000
    report = (out / "report.md").read_text()
    for png in PNGS:
        assert f"]({png})" in report
    rows = _table(report)
    assert [row["run"] for row in rows] == ["personal", "shared"]
    for row, path in zip(rows, runs, strict=True):
        expected = _expected(path)
        for column, value in expected.items():
            if isinstance(value, str):
                assert row[column] == value, column
            elif column.startswith("bytes") or column in ("rounds", "best at round"):
                assert int(row[column]) == int(value), column
            else:
                assert float(row[column]) == pytest.approx(float(value), abs=5.1e-5), column
        if "fine-tuned test acc" not in expected:
            assert row["fine-tuned test acc"] == "-"
    assert int(rows[1]["bytes down+up"]) > 0
    assert float(rows[0]["fine-tuned test acc"]) > 0


def test_messages_by_label(runs):
    """The per-label split of the plots and label tables: down received by the workers, up sent by
    them, every other label sent by every rank (as /rounds counts them); rank 0's seconds."""
    run = load_run(runs[1])
    with h5py.File(runs[1], "r", locking=False) as f:
        labels = json.loads(f.attrs["comm_labels"])
        sent, received, seconds = (f["comm"][k][()] for k in ("bytes_sent", "bytes_received", "seconds"))
        seconds_comm = f["rounds/seconds_comm"][()]
    moved = bytes_by_label(run)
    for j, label in enumerate(labels):
        expected = {"down": received[:, 1:, j].sum(axis=1), "up": sent[:, 1:, j].sum(axis=1)}
        np.testing.assert_array_equal(moved[:, j], expected.get(label, sent[:, :, j].sum(axis=1)))
    np.testing.assert_allclose(server_seconds_by_label(run).sum(axis=1), seconds_comm)
    assert np.array_equal(run.round_numbers, [1, 2, 3])


def test_report_of_one_run_and_a_bad_file(runs, tmp_path, capsys):
    out = tmp_path / "one"
    assert main(["report", str(runs[0]), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*PNGS, "report.md"])
    assert len(_table((out / "report.md").read_text())) == 1
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f.attrs["format"] = "something else"
    assert main(["report", str(bad), "-o", str(tmp_path / "bad")]) == 1
    assert "not a pfl_mpi run file" in capsys.readouterr().err


def test_same_names_get_the_file_name_in_the_legend(runs, tmp_path):
    from pfl_mpi.report.build import _name_runs

    twice = [load_run(runs[0]), load_run(runs[0])]
    _name_runs(twice)
    assert twice[0].label == "personal: personal (fedper)"
