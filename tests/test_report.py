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
FILES = sorted([*PNGS, "report.md", "groups.csv", "cost.csv"])


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


def _table(report: str, section: str = "## Runs") -> list[dict[str, str]]:
    lines = report.split(section, 1)[1].strip().splitlines()
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
        name, algorithm, status, seed = (f.attrs[k] for k in ("name", "algorithm", "status", "seed"))
    evaluated = np.flatnonzero(~np.isnan(r["test_acc"]))
    out = {
        "run": name,
        "seed": str(seed),
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
    assert sorted(p.name for p in out.iterdir()) == FILES
    captured = capsys.readouterr()
    assert captured.out.count("wrote ") == len(FILES)
    # fedper with fine-tuning against fedavg: more than one key differs, and the report says which
    (warning,) = captured.err.strip().splitlines()
    assert warning.startswith("pfl-mpi: warning: the groups differ in 4 config keys: ")
    for key in ("algorithm.name", "eval_every", "finetune_epochs", "rounds"):
        assert key in warning and f"{key}: " in captured.out
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
    assert sorted(p.name for p in out.iterdir()) == FILES
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


# -- groups of seeds --------------------------------------------------------------------------------


def _variant(src: Path, dst: Path, seed: int, shift: float, **config) -> Path:
    """A copy of run ``src`` as if run with another seed (and config keys): its accuracies shifted."""
    import shutil

    import yaml

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        cfg = yaml.safe_load(f.attrs["config"])
        cfg["seed"] = seed
        for key, value in config.items():
            section, _, name = key.partition(".")
            cfg[section][name] = value
        f.attrs["config"] = yaml.safe_dump(cfg)
        f.attrs["seed"] = seed
        for name in ("test_acc", "test_acc_mean"):
            f["rounds"][name][...] = np.minimum(f["rounds"][name][()] + shift, 1.0)
    return dst


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """FedAvg with seeds 0, 1, 2 and FedPer with seeds 0, 1 (real runs), and a FedPer run with another lr."""
    tmp = tmp_path_factory.mktemp("seeds")
    files = {}
    for algorithm, seeds_ in (("fedavg", (0, 1, 2)), ("fedper", (0, 1))):
        for seed in seeds_:
            path = tmp / f"{algorithm}-{seed}.h5"
            cfg = tiny_config(path, algorithm, name="cmp", rounds=3, seed=seed, device="cpu")
            assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
            files[algorithm, seed] = path
    cfg = tiny_config(tmp / "lr.h5", "fedper", name="cmp", rounds=3, seed=2, device="cpu", **{"train.lr": 0.05})
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    files["fedper", "lr"] = tmp / "lr.h5"
    return files


def _final(path: Path) -> float:
    with h5py.File(path, "r", locking=False) as f:
        acc = f["rounds/test_acc"][: int(f.attrs["rounds_completed"])]
    return float(acc[~np.isnan(acc)][-1])


def _group_rows(text: str) -> dict[str, dict[str, str]]:
    return {row["group"]: row for row in _table(text, "## Groups")}


def test_seeds_form_groups_with_mean_and_sample_std(seeds, tmp_path, capsys):
    paths = [seeds[k] for k in (("fedavg", 0), ("fedper", 0), ("fedavg", 1), ("fedper", 1), ("fedavg", 2))]
    out = tmp_path / "r"
    assert main(["report", *map(str, paths), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # only algorithm.name differs: a fair comparison, no warning
    assert "algorithm.name: fedavg (n=3): fedavg, fedper (n=2): fedper" in captured.out
    rows = _group_rows((out / "report.md").read_text())
    assert list(rows) == ["fedavg (n=3)", "fedper (n=2)"]
    with open(out / "groups.csv", newline="") as f:
        exact = {row["group"]: row for row in __import__("csv").DictReader(f)}
    for algorithm, group_seeds in (("fedavg", (0, 1, 2)), ("fedper", (0, 1))):
        finals = np.array([_final(seeds[algorithm, s]) for s in group_seeds])
        n = len(finals)
        std = np.sqrt(((finals - finals.mean()) ** 2).sum() / (n - 1))
        row = rows[f"{algorithm} (n={n})"]
        assert (row["n"], row["seeds"]) == (str(n), " ".join(map(str, group_seeds)))
        mean_text, std_text = row["final test acc"].split(" ± ")
        assert float(mean_text) == pytest.approx(finals.mean(), abs=5.1e-5)
        assert float(std_text) == pytest.approx(std, abs=5.1e-5)
        assert float(exact[row["group"]]["final_acc_mean"]) == pytest.approx(finals.mean(), rel=1e-12)
        assert float(exact[row["group"]]["final_acc_std"]) == pytest.approx(std, rel=1e-12)
    assert len(_table((out / "report.md").read_text())) == 5  # and every run in the per-run table


def test_a_comparison_that_changes_more_than_the_compared_key_warns(seeds, tmp_path, capsys):
    paths = [seeds["fedavg", 0], seeds["fedavg", 1], seeds["fedper", "lr"]]
    assert main(["report", *map(str, paths), "-o", str(tmp_path / "r"), "--by", "algorithm.name"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "pfl-mpi: warning: the groups differ in more than algorithm.name: also train.lr; compare like with like "
        "(one config, one key changed: pfl-mpi sweep --set-grid)"
    )
    assert "train.lr: fedavg (n=2): 0.1, fedper: 0.05" in captured.out
    report = (tmp_path / "r" / "report.md").read_text()
    assert "**Warning:** the groups differ in more than algorithm.name" in report


def test_group_by_averages_over_another_key(seeds, tmp_path, capsys):
    paths = [seeds["fedper", 0], seeds["fedper", 1], seeds["fedper", "lr"]]
    assert main(["report", *map(str, paths), "-o", str(tmp_path / "r"), "--group-by", "train.lr"]) == 0
    capsys.readouterr()
    (row,) = _group_rows((tmp_path / "r" / "report.md").read_text()).values()
    finals = np.array([_final(p) for p in paths])
    assert row["n"] == "3" and row["seeds"] == "0 1 2"
    assert float(row["final test acc"].split(" ± ")[0]) == pytest.approx(finals.mean(), abs=5.1e-5)


def test_unknown_key_exits_2_with_one_line(seeds, tmp_path, capsys):
    assert main(["report", str(seeds["fedavg", 0]), "-o", str(tmp_path / "r"), "--by", "algo.nme"]) == 2
    assert capsys.readouterr().err.strip() == "pfl-mpi: --by: no run has a config key 'algo.nme'"
    assert not (tmp_path / "r").exists()


def test_ten_groups_of_five_seeds_stay_readable(seeds, tmp_path, capsys):
    """50 runs: 10 learning rates x 5 seeds. One table row and one legend entry per group, figures of
    bounded size, and the band of each group spans its seeds."""
    paths = []
    for g in range(10):
        for s in range(5):
            shift = 0.01 * g + 0.002 * s
            paths.append(
                _variant(seeds["fedavg", 0], tmp_path / f"g{g}s{s}.h5", s, shift, **{"train.lr": 0.01 * (g + 1)})
            )
    out = tmp_path / "r"
    assert main(["report", *map(str, paths), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    rows = _group_rows((out / "report.md").read_text())
    assert len(rows) == 10 and {row["n"] for row in rows.values()} == {"5"}
    assert list(rows)[0] == "train.lr=0.01 (n=5)"  # the one differing key's value names the group
    base = _final(seeds["fedavg", 0])
    first = np.minimum(base + 0.002 * np.arange(5), 1.0)
    mean_text, std_text = rows["train.lr=0.01 (n=5)"]["final test acc"].split(" ± ")
    assert float(mean_text) == pytest.approx(first.mean(), abs=5.1e-5)
    assert float(std_text) == pytest.approx(first.std(ddof=1), abs=5.1e-5)
    for png in PNGS:
        height, width = matplotlib.image.imread(out / png).shape[:2]
        assert width == 1000 and height <= 1200, png
    assert (out / "report.md").read_text().count("### ") <= len(PNGS) + 10  # message tables: one per group


def test_two_differing_keys_name_the_groups_and_warn_without_by(seeds, tmp_path, capsys):
    """fedavg at lr 0.1 against fedper at lr 0.05: both keys in the legend; named with --by, no warning."""
    paths = [seeds["fedavg", 0], seeds["fedper", "lr"]]
    assert main(["report", *map(str, paths), "-o", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("pfl-mpi: warning: the groups differ in 2 config keys: algorithm.name, train.lr;")
    assert list(_group_rows((tmp_path / "a" / "report.md").read_text())) == [
        "fedavg, train.lr=0.1",
        "fedper, train.lr=0.05",
    ]
    by = ["--by", "algorithm.name", "--by", "train.lr"]
    assert main(["report", *map(str, paths), "-o", str(tmp_path / "b"), *by]) == 0
    assert capsys.readouterr().err == ""


def test_a_protocol_bytes_field_is_picked_up(runs, tmp_path, capsys):
    """A /rounds/protocol_bytes_* field (a later per-protocol ledger) gets a column in both tables, its
    total over the rounds, and a bar in comparison.png, without the report knowing its name."""
    import shutil

    path = tmp_path / "ledger.h5"
    shutil.copy(runs[1], path)
    per_round = np.array([1000.0, 2000.0, 4000.0])
    with h5py.File(path, "r+") as f:
        f["rounds"].create_dataset("protocol_bytes_tcp", data=per_round)
    out = tmp_path / "r"
    assert main(["report", str(path), "-o", str(out)]) == 0
    capsys.readouterr()
    report = (out / "report.md").read_text()
    (run_row,) = _table(report)
    (group_row,) = _table(report, "## Groups")
    assert int(run_row["protocol bytes tcp"]) == 7000
    assert float(group_row["protocol bytes tcp"]) == 7000
    from pfl_mpi.report.plots import byte_fields

    protocol = ["protocol_bytes_down", "protocol_bytes_eval", "protocol_bytes_tcp", "protocol_bytes_up"]
    assert byte_fields([load_run(path)]) == [*protocol, "bytes_down", "bytes_up", "bytes_other"]
