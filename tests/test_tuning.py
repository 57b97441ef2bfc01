"""Tuning on validation: the grids declared beside each algorithm's Params, their checks, and the choice that
``pfl-mpi sweep --tune`` makes from the run files (on val, never on test)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from pfl_mpi.algorithms.ditto import Ditto
from pfl_mpi.algorithms.fedper import FedPer
from pfl_mpi.algorithms.fedprox import FedProx
from pfl_mpi.algorithms.pfedhn import PFedHN
from pfl_mpi.algorithms.registry import _REGISTRY
from pfl_mpi.cli import main
from pfl_mpi.errors import ConfigError
from pfl_mpi.store.layout import FORMAT
from pfl_mpi.tuning import TUNING_TRIALS, Trial, check_tuning_grid, choose, score_trials, tuning_grid_for

from .helpers import built_in_algorithms

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "default.yaml")  # FedPer on digits
TINY = ["rounds=2", "data.num_clients=10", "clients_per_round=5", "model.hidden=[16]", "data.val_fraction=0.3"]
SETS = [x for s in TINY for x in ("--set", s)]


def test_every_algorithm_declares_a_valid_grid_of_the_same_size():
    for name in built_in_algorithms():
        grid = check_tuning_grid(_REGISTRY[name])
        assert math.prod(len(values) for _, values in grid) == TUNING_TRIALS, name


def test_the_grid_is_read_from_the_algorithm_beside_its_params():
    assert tuning_grid_for(ROOT / "configs" / "fedprox.yaml", []) == [
        (key, [json.dumps(v) for v in values]) for key, values in FedProx.tuning_grid.items()
    ]
    mine = type("Mine", (FedProx,), {"tuning_grid": {"algorithm.mu": [0.5, 2], "train.lr": [0.2]}})
    assert check_tuning_grid(mine) == [("algorithm.mu", ["0.5", "2"]), ("train.lr", ["0.2"])]
    aliased = check_tuning_grid(_REGISTRY["fedamp"])  # FedAMP's lambda_ is written 'lambda' in the config
    assert [key for key, _ in aliased][0] == "algorithm.lambda"


@pytest.mark.parametrize(
    ("base", "grid", "says"),
    [
        (
            FedProx,
            {"algorithm.muu": [0.1]},
            "algorithm.muu: not a key to tune (algorithm parameters: algorithm.weighting, algorithm.server_opt,",
        ),
        (FedProx, {"data.num_clients": [5]}, "data.num_clients: not a key to tune"),
        (FedProx, {"algorithm.name": ["fedavg"]}, "algorithm.name: not a key to tune"),
        (PFedHN, {"train.lr": [0.1]}, "train.lr: pfedhn does not use it; tune algorithm.inner_lr"),
        (FedProx, {"algorithm.mu": []}, "algorithm.mu: give a non-empty list of values, not []"),
        (FedProx, {"algorithm.mu": [0.1, 0.1]}, "algorithm.mu: a value is repeated in [0.1, 0.1]"),
        (FedProx, {"algorithm.mu": [-1.0]}, "algorithm.mu=-1.0: Input should be greater than or equal to 0"),
        (FedProx, {"train.lr": [0.1, 0]}, "train.lr=0: Input should be greater than 0"),
        (FedProx, {}, "declare it as {config key: [values, ...]}"),
    ],
)
def test_a_bad_grid_is_one_line_naming_its_entry(base, grid, says):
    bad = type("Bad", (base,), {"tuning_grid": grid})
    with pytest.raises(ConfigError) as err:
        check_tuning_grid(bad)
    text = str(err.value)
    assert text.startswith(f"{base.name}.tuning_grid: {says}"), text
    assert "\n" not in text


def test_sweep_tune_with_a_bad_grid_key_exits_2_with_one_line(tmp_path, capsys):
    code = main(["sweep", CONFIG, *SETS, "--tune", "--set-grid", "algorithm.nope=1,2", "--runs-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("pfl-mpi: config error: algorithm.nope") and "\n" not in err, err
    assert not list(tmp_path.iterdir())  # nothing ran


def test_sweep_tune_lists_the_declared_grid_evaluated_on_val_and_test(tmp_path, capsys):
    code = main(["sweep", CONFIG, *SETS, "--tune", "--seeds", "0", "--runs-dir", str(tmp_path), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    lrs = FedPer.tuning_grid["train.lr"]  # FedPer's: the default grid
    assert [line.split()[1] for line in out.splitlines()] == [f"default-{v}:" for v in lrs] and len(lrs) == 4


def test_a_set_grid_key_replaces_it_where_declared_and_is_added_where_no_grid_has_it(tmp_path, capsys):
    import yaml

    configs = []
    for name in ("fedprox", "ditto"):
        raw = yaml.safe_load(Path(CONFIG).read_text())
        raw.update(name=name, algorithm={"name": name})
        configs.append(tmp_path / f"{name}.yaml")
        configs[-1].write_text(yaml.safe_dump(raw))
    grid = ["--set-grid", "algorithm.mu=0.5", "--set-grid", "train.momentum=0.0,0.5"]
    code = main(["sweep", *map(str, configs), *SETS, "--tune", *grid, "--runs-dir", str(tmp_path), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    names = [line.split("] ", 1)[1].split(":")[0] for line in out.splitlines()]
    lrs = FedProx.tuning_grid["train.lr"]
    assert lrs == Ditto.tuning_grid["train.lr"]  # both grids tune the client step size beside their own key
    assert names == [f"fedprox-0.5-{lr}-{m}" for lr in lrs for m in ("0.0", "0.5")] + [
        f"ditto-{lam}-{lr}-{m}" for lam in Ditto.tuning_grid["algorithm.lam"] for lr in lrs for m in ("0.0", "0.5")
    ]


def test_sweep_tune_without_a_validation_split_exits_2(tmp_path, capsys):
    sets = [x for s in TINY if not s.startswith("data.val_fraction") for x in ("--set", s)]
    code = main(["sweep", CONFIG, *sets, "--tune", "--runs-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "data.val_fraction" in err and "\n" not in err, err


def _run_file(path: Path, val: list[float], test: list[float], status: str = "completed") -> Path:
    """A run file holding only what the choice reads: status, rounds completed, /rounds/val_acc and test_acc."""
    with h5py.File(path, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["status"] = status
        f.attrs["rounds_completed"] = len(val)
        f["rounds/val_acc"] = np.array(val)
        f["rounds/test_acc"] = np.array(test)
    return path


def test_the_choice_is_the_best_validation_point_not_the_best_test_point(tmp_path):
    a = _run_file(tmp_path / "a.h5", [np.nan, 0.80], [np.nan, 0.95])  # best on test
    b = _run_file(tmp_path / "b.h5", [np.nan, 0.90], [np.nan, 0.70])  # best on val
    c = _run_file(tmp_path / "c.h5", [0.99, np.nan], [0.99, np.nan], status="diverged")  # best until it diverged
    trials = score_trials([({"k": "a"}, [a]), ({"k": "b"}, [b]), ({"k": "c"}, [c])])
    assert [(t.score, t.test) for t in trials[:2]] == [(0.80, 0.95), (0.90, 0.70)]
    assert math.isnan(trials[2].score) and trials[2].notes == ["c.h5: diverged"]
    assert choose(trials).point == {"k": "b"}


def test_the_choice_averages_seeds_and_minimises_a_loss(tmp_path):
    files = [_run_file(tmp_path / f"{n}.h5", [v], [0.0]) for n, v in (("a0", 0.9), ("a1", 0.5), ("b0", 0.7))]
    trials = score_trials([({"k": "a"}, files[:2]), ({"k": "b"}, files[2:])])
    assert [t.score for t in trials] == [pytest.approx(0.7), 0.7]
    assert choose(trials).point == {"k": "a"}  # a tie goes to the earlier point
    assert choose([Trial({"k": "x"}, [], 2.0), Trial({"k": "y"}, [], 1.0)], "val_loss").point == {"k": "y"}
    with pytest.raises(ValueError, match="no trial recorded a final val_acc"):
        choose([Trial({"k": "x"}, [])])


TIMINGS = ("seconds", "cpu", "wall", "waiting")  # per-round timings differ between any two runs


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """``sweep --tune`` of FedPer's train.lr over two values (each run a process of its own): runs dir, output."""
    runs = tmp_path_factory.mktemp("tune")
    grid = ["--set-grid", "train.lr=0.01,0.5"]  # replaces the declared values of train.lr
    argv = ["sweep", CONFIG, *SETS, "--tune", *grid, "--runs-dir", str(runs), "--jobs", "2", "--no-report"]
    return runs, argv


def test_sweep_tune_runs_the_grid_and_records_the_best_validation_point(tuned, capsys):
    runs, argv = tuned
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    assert not (runs / "report").exists()
    final = {}
    for lr in ("0.01", "0.5"):
        with h5py.File(runs / f"default-{lr}.h5", "r", locking=False) as f:
            final[lr] = (float(f["rounds/val_acc"][-1]), float(f["rounds/test_acc"][-1]))
    assert final["0.01"][0] != final["0.5"][0]
    best = max(final, key=lambda lr: final[lr][0])
    held = json.loads((runs / "tuning.json").read_text())["default"]
    assert held["best"] == {"train.lr": best} and held["set"] == [f"train.lr={best}"]
    assert [(t["point"]["train.lr"], t["score"], t["test"]) for t in held["trials"]] == [
        (lr, *final[lr]) for lr in ("0.01", "0.5")
    ]
    assert f"best: --set train.lr={best}  (val_acc {final[best][0]:.4f})" in out


def _datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of a run file but the timings, by path."""
    found = {}

    def keep(name: str, obj) -> None:  # visititems stops at a callback that returns a value
        if isinstance(obj, h5py.Dataset) and not any(word in name.rsplit("/", 1)[-1] for word in TIMINGS):
            found[name] = obj[()]

    with h5py.File(path, "r", locking=False) as f:
        f.visititems(keep)
    assert len(found) > 20  # rounds, clients, checkpoint, ...
    return found


def test_in_process_workers_write_the_same_files(tuned, tmp_path, capsys):
    runs, argv = tuned
    if not (runs / "tuning.json").exists():
        assert main(argv) == 0
    mine = [*argv[: argv.index("--runs-dir")], "--runs-dir", str(tmp_path), "--jobs", "2", "--no-report"]
    assert main([*mine, "--in-process"]) == 0, capsys.readouterr().out
    for lr in ("0.01", "0.5"):
        one, other = _datasets(runs / f"default-{lr}.h5"), _datasets(tmp_path / f"default-{lr}.h5")
        assert one.keys() == other.keys()
        for name, value in one.items():
            assert np.array_equal(value, other[name], equal_nan=value.dtype.kind == "f"), name
    assert "(in a sweep worker)" in (tmp_path / "logs" / "default-0.5.log").read_text()
    held = [json.loads((d / "tuning.json").read_text())["default"] for d in (runs, tmp_path)]
    assert held[0]["trials"] == held[1]["trials"] and held[0]["best"] == held[1]["best"]


def test_in_process_needs_one_rank(tmp_path, capsys):
    code = main(["sweep", CONFIG, *SETS, "--in-process", "-n", "2", "--runs-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert (
        code == 2
        and err == "pfl-mpi: config error: --in-process: runs each task in a worker process of one rank: drop -n 2"
    )
