"""``data.eval_on: [val, test]``: every evaluation round scores the validation split beside the test split and
records it like test (``val_*`` per round and per client), without changing any test metric."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from pfl_mpi.cli import main
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.runtime import Engine
from pfl_mpi.runtime.progress import round_line
from pfl_mpi.runtime.record import eval_columns, split_metric
from pfl_mpi.training.tasks import TASKS

from .helpers import committed, tiny_config
from .test_datasets_fixtures import write_split_file


def _run(cfg, resume: bool = False) -> Engine:
    engine = Engine(cfg, SerialWorld(), resume=resume, show_progress=False)
    assert engine.run() == 0
    return engine


def _metrics(path: Path, prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Every /rounds and /clients dataset whose name starts with one of ``prefixes``, committed rounds only; the
    validation split's (``*val_*``) only if a prefix names it."""
    val = any("val_" in p for p in prefixes)
    with h5py.File(path, "r", locking=False) as f:
        names = [
            (g, n) for g in ("rounds", "clients") for n in f[g] if n.startswith(prefixes) and (val or "val_" not in n)
        ]
    return {f"{g}/{n}": committed(path, g, n) for g, n in names}


def _own_file(path: Path, swap: bool = False) -> Path:
    """``write_split_file``'s file; ``swap``: the same rows with the val and test tags exchanged."""
    write_split_file(path)
    if swap:
        with h5py.File(path, "r+") as f:
            split = f["split"][()]
            f["split"][...] = np.where(split == b"val", b"test", np.where(split == b"test", b"val", split))
    return path


def _own(out: Path, data: Path, **sets):
    base = {"data.name": "file", "data.path": str(data), "data.num_clients": 5, "data.min_samples": 2}
    base.update({"data.partition": "natural", "model.hidden": "[8]", "eval_every": 2, "clients_per_round": 3})
    return tiny_config(out, "fedper", **{"rounds": 4, **base, **sets})


def test_column_names_of_each_split() -> None:
    task = TASKS["classification"]
    assert eval_columns(task, ("test",), (), False, False) == ("client", "num_test", "test_loss", "test_acc")
    columns = eval_columns(task, ("test", "val"), ("head_test_loss", "head_test_acc"), True, True)
    assert columns[6:] == (
        *("finetune_test_loss", "finetune_test_acc", "global_test_loss", "global_test_acc", "num_val"),
        *("val_loss", "val_acc", "head_val_loss", "head_val_acc", "finetune_val_loss", "finetune_val_acc"),
        *("global_val_loss", "global_val_acc"),
    )
    assert split_metric("proto_dist", "val") == "val_proto_dist"
    assert eval_columns(TASKS["regression"], ("val",), (), False, False)[2:] == ("val_mse", "val_rmse")


def test_val_beside_test_leaves_every_test_metric_bit_identical(tmp_path: Path) -> None:
    """digits with val_fraction: the run with eval_on [val, test] has the test run's training and test metrics
    bit for bit, and val_* per round (evaluated rounds only) and per client, pooled by validation samples."""
    sets = {"data.val_fraction": 0.25, "finetune_epochs": 1, "algorithm.lam": 0.5}
    _run(tiny_config(tmp_path / "test.h5", "ditto", **sets))
    _run(tiny_config(tmp_path / "both.h5", "ditto", **sets, **{"data.eval_on": "[val, test]"}))
    test, both = (_metrics(tmp_path / f"{n}.h5", ("test_", "train_", "finetune_", "global_")) for n in ("test", "both"))
    assert set(both) == set(test) and "rounds/global_test_acc" in test
    for name, value in test.items():
        np.testing.assert_array_equal(both[name], value, err_msg=name)
    val = _metrics(tmp_path / "both.h5", ("val_", "finetune_val_", "global_val_"))
    assert {"rounds/val_acc", "rounds/val_loss", "rounds/val_acc_mean", "clients/val_acc"} <= set(val)
    assert {"rounds/finetune_val_acc", "rounds/global_val_acc", "clients/global_val_acc"} <= set(val)
    assert np.isfinite(val["rounds/val_acc"]).all() and np.isfinite(val["clients/val_acc"]).all()  # eval_every 1
    with h5py.File(tmp_path / "both.h5") as f:
        n_val = f["partition/val_sizes"][()]
    for metric in ("val_acc", "val_loss", "global_val_acc"):
        pooled = (val[f"clients/{metric}"] * n_val).sum(axis=1) / n_val.sum()
        np.testing.assert_allclose(val[f"rounds/{metric}"], pooled, rtol=1e-6, err_msg=metric)
    assert not np.array_equal(val["clients/val_acc"], test["clients/test_acc"])


def test_val_rows_are_the_files_val_rows(tmp_path: Path) -> None:
    """An own file with a split: its val scores equal the test scores of the same file with the val and test tags
    swapped (training reads neither), bit for bit; eval_on [val] alone writes no test metric; every evaluated
    round is in the HDF5 file, the others are NaN."""
    _run(_own(tmp_path / "val.h5", _own_file(tmp_path / "own.h5"), **{"data.eval_on": "[val]"}))
    _run(_own(tmp_path / "swapped.h5", _own_file(tmp_path / "swapped-own.h5", swap=True)))
    val, swapped = _metrics(tmp_path / "val.h5", ("val_",)), _metrics(tmp_path / "swapped.h5", ("test_",))
    assert set(val) == {name.replace("test_", "val_") for name in swapped}
    for name, value in swapped.items():
        np.testing.assert_array_equal(val[name.replace("test_", "val_")], value, err_msg=name)
    assert np.isnan(val["rounds/val_acc"][[0, 2]]).all() and np.isfinite(val["rounds/val_acc"][[1, 3]]).all()
    with h5py.File(tmp_path / "val.h5") as f:
        assert not any(n.startswith("test_") for n in f["rounds"])
        assert np.isnan(f["clients/test_acc"][()]).all()  # the test split stays unseen
        np.testing.assert_array_equal(f["partition/val_sizes"][()], [4] * 5)
        assert [n.decode() for n in f["partition/client_names"][()]] == [f"site-{u:02d}" for u in range(5)]


def test_the_deprecated_eval_split_val_is_eval_on_val(tmp_path: Path) -> None:
    own = _own_file(tmp_path / "own.h5")
    _run(_own(tmp_path / "on.h5", own, **{"data.eval_on": "[val]"}))
    with pytest.warns(FutureWarning, match="data.eval_split is deprecated"):
        cfg = _own(tmp_path / "split.h5", own, **{"data.eval_split": "val"})
    _run(cfg)
    on, split = _metrics(tmp_path / "on.h5", ("val_", "test_")), _metrics(tmp_path / "split.h5", ("val_", "test_"))
    assert set(on) == set(split) and "rounds/val_acc" in on
    for name, value in on.items():
        np.testing.assert_array_equal(split[name], value, err_msg=name)


def test_batched_evaluation_scores_val_like_one_client_after_another(tmp_path: Path) -> None:
    """train.client_batch 4: the stacked evaluation and fine-tuning score val as the one-by-one run does."""
    sets = {"data.val_fraction": 0.3, "data.eval_on": "[val, test]", "finetune_epochs": 1, "rounds": 2}
    _run(tiny_config(tmp_path / "one.h5", "fedavg", **sets, **{"train.client_batch": 1}))
    _run(tiny_config(tmp_path / "four.h5", "fedavg", **sets, **{"train.client_batch": 4}))
    one, four = (_metrics(tmp_path / f"{n}.h5", ("val_", "finetune_val_")) for n in ("one", "four"))
    assert set(one) == set(four) and "clients/finetune_val_acc" in one
    for name, value in one.items():
        np.testing.assert_allclose(four[name], value, rtol=1e-5, err_msg=name)


def test_an_algorithms_own_metrics_are_named_for_val(tmp_path: Path) -> None:
    """FedProto's head_test_* (its own evaluate_client) gets head_val_* on the validation split."""
    sets = {"data.val_fraction": 0.3, "data.eval_on": "[val, test]", "rounds": 1}
    _run(tiny_config(tmp_path / "proto.h5", "fedproto", **sets))
    metrics = _metrics(tmp_path / "proto.h5", ("head_", "val_"))
    assert {"rounds/head_val_acc", "rounds/head_test_acc", "rounds/val_acc", "clients/head_val_loss"} <= set(metrics)
    assert np.isfinite(metrics["rounds/head_val_acc"]).all()


def test_a_run_with_val_resumes_bit_for_bit(tmp_path: Path) -> None:
    own = _own_file(tmp_path / "own.h5")
    sets = {"data.eval_on": "[val, test]", "finetune_epochs": 1}
    _run(_own(tmp_path / "straight.h5", own, **sets))
    _run(_own(tmp_path / "resumed.h5", own, **{**sets, "rounds": 2}))
    assert _run(_own(tmp_path / "resumed.h5", own, **sets), resume=True).start_round == 2
    prefixes = ("val_", "test_", "finetune_", "train_")
    straight, resumed = _metrics(tmp_path / "straight.h5", prefixes), _metrics(tmp_path / "resumed.h5", prefixes)
    assert set(straight) == set(resumed) and "clients/finetune_val_acc" in straight
    for name, value in straight.items():
        rows = slice(2, None) if "finetune_" in name else slice(None)  # the stopped run fine-tuned at its round 2
        np.testing.assert_array_equal(resumed[name][rows], value[rows], err_msg=name)


def test_progress_line_report_and_csv_show_val(tmp_path: Path) -> None:
    line = round_line(4, {"round": 1, "train_loss": 0.5, "val_acc": 0.61, "test_acc": 0.6, "bytes_down": 0.0,
                          "bytes_up": 0.0, "seconds_wall": 0.1})  # fmt: skip
    assert "val_acc 0.6100  test_acc 0.6000" in line
    assert "val_acc" not in round_line(4, {"round": 1, "train_loss": 0.5, "test_acc": 0.6, "bytes_down": 0.0,
                                           "bytes_up": 0.0, "seconds_wall": 0.1})  # fmt: skip
    cfg = _own(tmp_path / "runs" / "own.h5", _own_file(tmp_path / "own.h5"), **{"data.eval_on": "[val, test]"})
    _run(cfg)
    val, test = committed(cfg.output_path, "rounds", "val_acc"), committed(cfg.output_path, "rounds", "test_acc")
    best = int(np.nanargmax(val))
    assert main(["report", str(cfg.output_path), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "best val acc" in report and "test acc at best val" in report and "`/rounds/val_acc`" in report
    groups = (tmp_path / "report" / "groups.csv").read_text().splitlines()
    header, row = groups[0].split(","), groups[1].split(",")
    assert math.isclose(float(row[header.index("test_at_best_val_mean")]), test[best])
    assert math.isclose(float(row[header.index("final_val_acc_mean")]), val[~np.isnan(val)][-1])
    assert main(["export", str(cfg.output_path), "--csv", str(tmp_path / "csv")]) == 0
    rounds = (tmp_path / "csv" / "rounds.csv").read_text().splitlines()[0].split(",")
    assert {"val_acc", "val_loss", "test_acc"} <= set(rounds)
    shutil.rmtree(tmp_path / "report")


def test_run_summary_and_info_show_val_beside_test(tmp_path: Path, capsys) -> None:
    """``pfl-mpi run``'s closing summary and ``pfl-mpi info`` give the validation scores of the last evaluated
    round on a line of their own, before the test scores, with the file's values."""
    from pfl_mpi.report.score_lines import score_lines

    cfg = _own(tmp_path / "own-run.h5", _own_file(tmp_path / "own.h5"), **{"data.eval_on": "[val, test]"})
    engine = _run(cfg)
    val = committed(cfg.output_path, "rounds", "val_acc")
    lines = score_lines(engine.last_metrics, "final")
    assert [line.split(" (")[0] for line in lines] == [
        f"  final validation accuracy {val[-1]:.4f}",
        f"  final test accuracy {committed(cfg.output_path, 'rounds', 'test_acc')[-1]:.4f}",
    ]
    assert main(["info", str(cfg.output_path)]) == 0
    out = capsys.readouterr().out
    last = len(val)  # eval_every 2 of 4 rounds: the last round is evaluated
    assert f"  last evaluation (round {last}): validation accuracy {val[-1]:.4f}" in out
    assert out.index("validation accuracy") < out.index("test accuracy")


def test_score_lines_name_regression_scores_and_skip_what_was_not_evaluated() -> None:
    from pfl_mpi.report.score_lines import score_lines

    values = {"test_rmse": 0.5, "test_rmse_mean": 0.45, "test_rmse_std": 0.1, "test_mse": 0.25, "val_acc": math.nan}
    assert score_lines(values, "final") == ["  final test RMSE 0.5000 (client mean 0.4500 +- 0.1000), test MSE 0.2500"]
    assert score_lines({"test_acc": math.nan}, "final") == []
