"""``pfl-mpi sweep``: a 2 x 3 grid run here, its grouped table against the run files, skips and resumes."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from pfl_mpi.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "default.yaml")
TINY = ["rounds=2", "eval_every=1", "data.num_clients=10", "clients_per_round=5", "model.hidden=[16]"]
SETS = [x for s in TINY for x in ("--set", s)]
GRID = ["--set-grid", "algorithm.name=fedavg,fedper", "--seeds", "0", "1", "2"]
NAMES = [f"default-{a}-s{s}" for a in ("fedavg", "fedper") for s in (0, 1, 2)]


def _final_acc(path: Path) -> float:
    """The last evaluated /rounds/test_acc, read with h5py."""
    with h5py.File(path, "r", locking=False) as f:
        acc = f["rounds/test_acc"][: int(f.attrs["rounds_completed"])]
    return float(acc[~np.isnan(acc)][-1])


def _table(text: str) -> list[dict[str, str]]:
    """The group table printed by the sweep (the first markdown table of its output)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            break
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The grid run once, with one task's file interrupted beforehand (1 of its 2 rounds done)."""
    runs = tmp_path_factory.mktemp("sweep") / "runs"
    runs.mkdir()
    partial = runs / "default-fedper-s1.h5"
    pre = ["run", CONFIG, *SETS, "--set", "algorithm.name=fedper", "--set", "seed=1", "--set", "rounds=1"]
    assert main([*pre, "--out", str(partial), "--quiet"]) == 0
    return runs


def test_sweep_runs_the_grid_and_its_group_table_matches_the_files(sweep, capsys):
    code = main(["sweep", CONFIG, *SETS, *GRID, "--runs-dir", str(sweep), "--jobs", "2", "-n", "1"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, out
    assert "warning" not in captured.err  # the grid's key is the compared one, and the only one that differs
    assert sorted(p.stem for p in sweep.glob("*.h5")) == sorted(NAMES)
    assert "default-fedper-s1: continued, done" in out
    assert len(re.findall(r": started, done in", out)) == 5

    with h5py.File(sweep / "default-fedper-s1.h5", "r", locking=False) as f:  # the interrupted run went on
        assert f.attrs["rounds_completed"] == 2 and f.attrs["status"] == "completed"
        assert [entry["rounds_completed"] for entry in json.loads(f.attrs["resumes"])] == [1]
    for name in NAMES:
        with h5py.File(sweep / f"{name}.h5", "r", locking=False) as f:
            assert f.attrs["algorithm"] == name.split("-")[1] and f"s{f.attrs['seed']}" == name.split("-")[2]

    rows = {row["group"]: row for row in _table(out)}
    assert sorted(rows) == ["fedavg (n=3)", "fedper (n=3)"]
    with open(sweep / "report" / "groups.csv", newline="") as f:
        exact = {row["group"]: row for row in csv.DictReader(f)}
    for algorithm in ("fedavg", "fedper"):
        finals = np.array([_final_acc(sweep / f"default-{algorithm}-s{s}.h5") for s in (0, 1, 2)])
        mean, std = finals.mean(), np.sqrt(((finals - finals.mean()) ** 2).sum() / 2)  # sample std, n - 1 = 2
        row = rows[f"{algorithm} (n=3)"]
        assert (row["n"], row["seeds"], row["rounds"]) == ("3", "0 1 2", "2")
        shown_mean, shown_std = (float(x) for x in row["final test acc"].split(" ± "))
        assert shown_mean == pytest.approx(mean, abs=5.1e-5) and shown_std == pytest.approx(std, abs=5.1e-5)
        csv_row = exact[f"{algorithm} (n=3)"]
        assert float(csv_row["final_acc_mean"]) == pytest.approx(mean, rel=1e-12)
        assert float(csv_row["final_acc_std"]) == pytest.approx(std, rel=1e-12)
        assert csv_row["final_acc_n"] == "3"
    assert std > 0  # the seeds gave different runs: the check above compared real spreads
    assert "algorithm.name: fedavg (n=3): fedavg, fedper (n=3): fedper" in out
    report = (sweep / "report" / "report.md").read_text()
    assert "| fedavg (n=3) | 3 | 0 1 2 | 2 |" in report


def test_a_second_sweep_skips_every_complete_file(sweep, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in sweep.glob("*.h5")}
    assert len(before) == 6
    assert main(["sweep", CONFIG, *SETS, *GRID, "--runs-dir", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert out.count("completed, skipped") == 6 and "started" not in out
    assert {p.name: p.stat().st_mtime_ns for p in sweep.glob("*.h5")} == before


def test_dry_run_says_what_would_happen(sweep, tmp_path, capsys):
    assert (
        main(["sweep", CONFIG, *SETS, "--set-grid", "train.lr=0.05,0.2", "--runs-dir", str(tmp_path), "--dry-run"]) == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"[1/2] default-0.05: would start {tmp_path}/default-0.05.h5",
        f"[2/2] default-0.2: would start {tmp_path}/default-0.2.h5",
    ]
    assert not list(tmp_path.glob("*.h5"))


@pytest.mark.parametrize(
    "options, message",
    [
        (["--set-grid", "algorithm.name"], "--set-grid: 'algorithm.name': write KEY=VALUE1,VALUE2"),
        (["--set-grid", "algorithm.name=fedavg,nosuch"], "algorithm.name"),
        (["--set-grid", "train.lr=0.1,0.1"], "--set-grid: train.lr: a value is repeated"),
        (["--jobs", "0"], "--jobs: must be at least 1, not 0"),
    ],
)
def test_bad_grid_exits_2_with_one_line(tmp_path, capsys, options, message):
    assert main(["sweep", CONFIG, *SETS, *options, "--runs-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pfl-mpi: config error: {message}"), err
    assert not (tmp_path / "r").exists()


def test_ctrl_c_ends_the_sweep_with_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(command, log):
        raise KeyboardInterrupt

    monkeypatch.setattr("pfl_mpi.commands.sweep._run_one", interrupted)
    assert main(["sweep", CONFIG, *SETS, "--runs-dir", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "pfl-mpi: sweep interrupted: the same command continues it"


def test_grid_values_with_commas_inside_brackets(tmp_path, capsys):
    grid = ["--set-grid", "model.hidden=[16],[8, 8]", "--set-grid", "train.lr=0.1,0.2"]
    assert main(["sweep", CONFIG, *SETS, *grid, "--seeds", "4", "--runs-dir", str(tmp_path), "--dry-run"]) == 0
    names = [line.split(": ")[0].split("] ")[1] for line in capsys.readouterr().out.splitlines()]
    assert names == ["default-16-0.1", "default-16-0.2", "default-8_8-0.1", "default-8_8-0.2"]
