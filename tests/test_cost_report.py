"""What runs paid for their accuracy: ``pfl-mpi report --target-acc``, cost.png and cost.csv, ``info`` and ``watch``
with the simulated clock. Every number is checked against the run files read with h5py."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import h5py
import numpy as np
import pytest

from pfl_mpi.cli import main
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.report import plots
from pfl_mpi.report.build import make_report
from pfl_mpi.report.cost import NO_NETWORK, NOT_REACHED
from pfl_mpi.report.groups import group_runs
from pfl_mpi.report.load import load_run
from pfl_mpi.report.watch import watch
from pfl_mpi.runtime import Engine

from .helpers import tiny_config

BY = ["--by", "algorithm.name"]  # the groups also differ in network.*: name them by the algorithm
NETWORK = {"network.enabled": "true", "network.speed_sigma": 1.0, "network.dropout": 0.2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[Path]]:
    """FedAvg with a simulated network on seeds 0 and 1 (dropout: their bytes and clocks differ), top-k without."""
    tmp = tmp_path_factory.mktemp("cost")
    out: dict[str, list[Path]] = {"fedavg": [], "topk": []}
    for algorithm, seeds, extra in (("fedavg", (0, 1), NETWORK), ("topk", (0,), {})):
        for seed in seeds:
            path = tmp / f"{algorithm}-{seed}.h5"
            cfg = tiny_config(path, algorithm, name="cost", rounds=4, seed=seed, device="cpu", **extra)
            assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
            out[algorithm].append(path)
    return out


def _rounds(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", locking=False) as f:
        return {k: v[: int(f.attrs["rounds_completed"])] for k, v in f["rounds"].items()}


def _paid(path: Path, target: float) -> tuple[int, float, float, float] | None:
    """(1-based round, bytes down, bytes up, simulated seconds) at the first round with test_acc >= target."""
    r = _rounds(path)
    for t, acc in enumerate(r["test_acc"]):
        if acc >= target:
            clock = float(r["simulated_time"][t]) if "simulated_time" in r else float("nan")
            return t + 1, r["protocol_bytes_down"][: t + 1].sum(), r["protocol_bytes_up"][: t + 1].sum(), clock
    return None


def _cost_rows(report: str) -> dict[str, dict[str, str]]:
    lines = report.split("## Communication cost", 1)[1].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return {row["group"]: row for row in rows}


def _mean_std(values: list[float], fmt: str) -> str:
    x = np.asarray(values, dtype=np.float64)
    return f"{x.mean():{fmt}}" if len(x) == 1 else f"{x.mean():{fmt}} ± {x.std(ddof=1):{fmt}}"


def test_cost_table_gives_what_each_group_paid_to_reach_the_target(runs, tmp_path, capsys):
    fedavg, (topk,) = runs["fedavg"], runs["topk"]
    accs = [acc for p in [*fedavg, topk] for acc in _rounds(p)["test_acc"]]
    best = sorted(float(_rounds(p)["test_acc"].max()) for p in fedavg)
    assert best[0] < best[1]  # seed 0 and 1 differ: between their best accuracies one reaches the target
    for i, target in enumerate((float(np.median(accs)), sum(best) / 2)):
        _check_target(fedavg, topk, target, tmp_path / f"r{i}", capsys)


def _check_target(fedavg: list[Path], topk: Path, target: float, out: Path, capsys) -> None:
    assert main(["report", *map(str, [*fedavg, topk]), "-o", str(out), "--target-acc", repr(target), *BY]) == 0
    printed = capsys.readouterr().out
    rows = _cost_rows((out / "report.md").read_text())
    assert set(rows) == {"fedavg (n=2)", "topk"}
    for group, paths in (("fedavg (n=2)", fedavg), ("topk", [topk])):
        row, files = rows[group], [_rounds(p) for p in paths]
        assert row["n"] == str(len(paths))
        assert row["protocol bytes down"] == _mean_std([r["protocol_bytes_down"].sum() for r in files], ".4g")
        assert row["protocol bytes up"] == _mean_std([r["protocol_bytes_up"].sum() for r in files], ".4g")
        paid = [_paid(p, target) for p in paths]
        reached = [p for p in paid if p is not None]
        suffix = "" if len(reached) == len(paid) else f" ({len(reached)}/{len(paid)} reached)"
        columns = (f"round to {target:g}", f"bytes down to {target:g}", f"bytes up to {target:g}")
        for i, (column, fmt) in enumerate(zip(columns, (".4g", ".4g", ".4g"), strict=True)):
            expected = _mean_std([p[i] for p in reached], fmt) + suffix if reached else NOT_REACHED
            assert row[column] == expected, (group, column)
        if group == "fedavg (n=2)" and len(reached) == 1:
            assert row[columns[0]].endswith(" (1/2 reached)")
        if group == "topk":  # no simulated network: said, not zeros
            assert row["simulated time (s)"] == row["simulated s per round"] == NO_NETWORK
            assert row[f"simulated s to {target:g}"] == NO_NETWORK
        else:
            assert row["simulated time (s)"] == _mean_std([r["simulated_time"][-1] for r in files], ".2f")
            assert row["simulated s per round"] == _mean_std(
                [r["simulated_round_seconds"].mean() for r in files], ".3f"
            )
            expected = _mean_std([p[3] for p in reached], ".2f") + suffix if reached else NOT_REACHED
            assert row[f"simulated s to {target:g}"] == expected
    assert "| fedavg (n=2) |" in printed.split("communication cost", 1)[1]  # printed as well
    with open(out / "cost.csv", newline="") as f:
        exact = {row["file"]: row for row in csv.DictReader(f)}
    for path in [*fedavg, topk]:
        row, paid, r = exact[path.name], _paid(path, target), _rounds(path)
        assert float(row["protocol_bytes_up"]) == r["protocol_bytes_up"].sum()
        assert float(row["target_acc"]) == target
        if paid is None:
            assert row["target_round"] == "" and np.isnan(float(row["target_bytes_up"]))
        else:
            assert (int(row["target_round"]), float(row["target_bytes_down"]), float(row["target_bytes_up"])) == paid[
                :3
            ]
        if "simulated_time" in r:
            assert float(row["simulated_time"]) == r["simulated_time"][-1]
        else:
            assert np.isnan(float(row["simulated_time"]))


def test_a_target_no_run_reaches_says_so(runs, tmp_path, capsys):
    best = max(np.nanmax(_rounds(p)["test_acc"]) for ps in runs.values() for p in ps)
    target = min(1.0, best + 0.01)
    make_report([*runs["fedavg"], *runs["topk"]], tmp_path / "r", by=["algorithm.name"], target=target)
    rows = _cost_rows((tmp_path / "r" / "report.md").read_text())
    assert rows["fedavg (n=2)"][f"round to {target:g}"] == NOT_REACHED
    assert rows["fedavg (n=2)"][f"simulated s to {target:g}"] == NOT_REACHED
    assert rows["topk"][f"simulated s to {target:g}"] == NO_NETWORK


@pytest.mark.parametrize("target", ["0", "1.5", "-0.2"])
def test_a_target_outside_0_1_exits_2_with_one_line(runs, tmp_path, capsys, target):
    assert main(["report", str(runs["topk"][0]), "-o", str(tmp_path / "r"), "--target-acc", target]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"pfl-mpi: --target-acc: a test accuracy is a fraction in (0, 1], got {float(target):g}"
    assert not (tmp_path / "r").exists()


def _cost_figure(paths: list[Path], monkeypatch, tmp_path: Path, target: float | None = None):
    """cost.png's figure for ``paths`` (one group per configuration), kept open instead of saved."""
    groups = group_runs([load_run(p) for p in paths])
    for group in groups:
        group.legend = group.runs[0].algorithm
    kept = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: kept.setdefault("fig", fig) and path)
    plots.cost(groups, tmp_path / "cost.png", target)
    return kept["fig"]


def test_cost_plot_draws_accuracy_against_the_files_cumulative_bytes_and_clock(runs, tmp_path, monkeypatch):
    """Every panel's curve is the group's accuracy per evaluated round against its mean cumulative protocol bytes
    (down + up, up, down) or simulated time; the group of two seeds has a band."""
    fig = _cost_figure(runs["fedavg"], monkeypatch, tmp_path, target=0.5)
    files = [_rounds(p) for p in runs["fedavg"]]
    acc = np.mean([r["test_acc"] for r in files], axis=0)
    down = np.mean([np.cumsum(r["protocol_bytes_down"]) for r in files], axis=0)
    up = np.mean([np.cumsum(r["protocol_bytes_up"]) for r in files], axis=0)
    clock = np.mean([r["simulated_time"] for r in files], axis=0)
    for ax, x in zip(fig.axes[:4], (down + up, up, down, clock), strict=True):
        (line, target_line) = ax.get_lines()
        np.testing.assert_allclose(line.get_xdata(), x)
        np.testing.assert_allclose(line.get_ydata(), acc)
        assert list(target_line.get_ydata()) == [0.5, 0.5]
        assert len(ax.collections) == 1  # the +- 1 std band of two seeds
    assert [ax.get_xscale() for ax in fig.axes[:4]] == ["log", "log", "log", "linear"]


def test_runs_without_a_network_have_no_time_curve(runs, tmp_path, monkeypatch):
    fig = _cost_figure(runs["topk"], monkeypatch, tmp_path)
    time_ax = fig.axes[3]
    assert time_ax.get_lines() == [] and time_ax.get_xticks().size == 0
    assert any(NO_NETWORK in text.get_text() for text in time_ax.texts)
    assert len(fig.axes[1].get_lines()) == 1  # the bytes are drawn


def test_info_and_watch_show_the_simulated_clock(runs, capsys):
    path = runs["fedavg"][0]
    r = _rounds(path)
    assert main(["info", str(path)]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if "simulated time" in ln]
    per = r["simulated_round_seconds"]
    assert line.strip().startswith(
        f"simulated time {r['simulated_time'][-1]:.2f} s over 4 rounds (per round: mean {per.mean():.3f} s, "
        f"min {per.min():.3f}, max {per.max():.3f}); selected clients: {r['clients_selected'].sum():.0f}, "
        f"trained {r['num_sampled'].sum():.0f}, unavailable 0, dropped {r['clients_dropped'].sum():.0f},"
    )
    assert main(["info", str(runs["topk"][0])]) == 0
    assert "simulated time: none (no simulated network" in capsys.readouterr().out
    stream = io.StringIO()
    assert watch(path, out=stream) == 0
    lines = stream.getvalue().splitlines()[:4]
    for t, line in enumerate(lines):
        assert f"  sim {per[t]:.2f} s (clock {r['simulated_time'][t]:.1f} s)  mpi " in line
    stream = io.StringIO()
    assert watch(runs["topk"][0], out=stream) == 0
    assert " sim " not in stream.getvalue()


def test_the_compression_configs_differ_only_in_name_and_algorithm():
    """configs/compression/: the same data, clients, rounds, model, training, network and seed; only the
    algorithm section (and the run's name) changes, so their report compares like with like."""
    from pfl_mpi.config import load_config

    paths = sorted((Path(__file__).parents[1] / "configs" / "compression").glob("*.yaml"))
    assert [p.stem for p in paths] == ["fedavg", "fetchsgd", "qsgd", "signsgd", "topk"]
    dumps = {}
    for path in paths:
        cfg = load_config(path).model_dump()
        assert cfg["algorithm"]["name"] == path.stem and cfg["name"] == f"compression-{path.stem}"
        assert cfg["network"]["enabled"] and cfg["data"]["name"] == "mnist1d"
        dumps[path.stem] = {k: v for k, v in cfg.items() if k not in ("name", "algorithm", "output")}
    assert all(dump == dumps["fedavg"] for dump in dumps.values())
