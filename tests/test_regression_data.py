"""Regression on real-valued targets (``data.targets: values``): a file's float y, [n] or [n, k], kept float32 from
the file to the clients' tensors and a k-output network; FedAvg learns y = x w + noise, and the recorded test_mse
is the final global model's squared error recomputed from the file alone. Partitions and weightings that need
class labels are refused in one line before MPI starts."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.data import DataConfig, load_federated
from pfl_mpi.runtime import Engine
from tests.helpers import committed, last_global_state, tiny_config
from tests.test_cli import _MPI_PREFIXES

N, D, USERS = 240, 4, 4


def write_regression_file(path: Path, width: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """x [N, D]; y = x w + noise, [N] (``width`` None) or [N, width], float64 in the file; client ids 0..3 and a
    split array (a quarter of the rows test). Written as .npz or .h5 by ``path``'s suffix; returns the arrays."""
    g = np.random.default_rng(seed)
    x = g.normal(size=(N, D)).astype(np.float32)
    w = g.normal(size=(D,) if width is None else (D, width))
    y = x.astype(np.float64) @ w + 0.1 * g.normal(size=(N,) if width is None else (N, width))
    arrays = {
        "x": x,
        "y": y,
        "client": np.arange(N) % USERS,
        "split": np.where((np.arange(N) // USERS) % 4 == 3, "test", "train"),
    }
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        with h5py.File(path, "w") as f:
            for name, a in arrays.items():
                f.create_dataset(name, data=a.astype("S") if a.dtype.kind == "U" else a)
    return arrays


def regression_config(out: Path, data_path: Path, **overrides):
    """FedAvg with a linear model on the file's 4 users (their own test rows), 6 rounds."""
    sets = {
        "task": "regression",
        "rounds": 6,
        "clients_per_round": USERS,
        "state_every": 1,
        "data.name": "file",
        "data.path": str(data_path),
        "data.targets": "values",
        "data.num_clients": USERS,
        "data.partition": "natural",
        "model.name": "logreg",
        "train.lr": 0.1,
    }
    sets.update(overrides)
    return tiny_config(out, **sets)


def test_values_are_float32_rows_of_the_file_and_labels_keep_failing(tmp_path):
    arrays = {"x": np.random.default_rng(1).normal(size=(60, 3)), "y": np.linspace(-2, 2, 120).reshape(60, 2)}
    arrays["x"][:, 0] = np.arange(60)  # traces each row back to the file
    np.savez(tmp_path / "v.npz", **arrays)
    cfg = DataConfig(name="file", path=str(tmp_path / "v.npz"), targets="values", num_clients=3, partition="iid")
    data = load_federated(cfg, 0)
    assert data.targets == "values" and data.num_classes == 2  # two values per sample
    seen = []
    for k in range(3):
        c = data.client(k)
        assert c.y_train.dtype == c.y_test.dtype == torch.float32 and c.y_train.shape[1:] == (2,)
        for x, y in ((c.x_train, c.y_train), (c.x_test, c.y_test)):
            rows = x[:, 0].numpy().astype(np.int64)
            np.testing.assert_array_equal(y.numpy(), arrays["y"][rows].astype(np.float32))
            seen.extend(rows.tolist())
    assert sorted(seen) == list(range(60))
    with pytest.raises(ValueError, match="no label histograms"):
        data.label_histograms()
    with pytest.raises(Exception, match="y must hold integer class labels, got dtype float64") as info:
        load_federated(DataConfig(name="file", path=str(tmp_path / "v.npz"), num_clients=3), 0)  # targets: labels
    assert info.value.key == "data.path"


@pytest.mark.parametrize(("suffix", "width"), [(".h5", None), (".npz", 2)])
def test_fedavg_learns_real_targets_and_records_the_global_models_mse(tmp_path, suffix, width):
    arrays = write_regression_file(tmp_path / f"reg{suffix}", width)
    cfg = regression_config(tmp_path / "run.h5", tmp_path / f"reg{suffix}")
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    k = 1 if width is None else width
    flat = last_global_state(cfg.output_path).astype(np.float64)  # logreg: one Linear(D, k), weight then bias
    assert flat.shape == (k * D + k,)
    weight, bias = flat[: k * D].reshape(k, D), flat[k * D :]
    test = arrays["split"] == "test"
    pred = arrays["x"][test].astype(np.float64) @ weight.T + bias
    expected = np.mean((pred - arrays["y"][test].reshape(-1, k)) ** 2)
    mse = committed(cfg.output_path, "rounds", "test_mse")
    assert mse[-1] == pytest.approx(expected, rel=1e-5)
    assert mse[-1] < 0.02 * arrays["y"][test].var()  # learns: far below the targets' variance
    with h5py.File(cfg.output_path) as f:
        assert f["partition/label_histograms"].shape == (USERS, 0)  # no classes to count


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith(_MPI_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    write_regression_file(tmp_path / "reg.h5")
    base = "name: reg\nrounds: 2\nclients_per_round: 4\ndevice: cpu\ntask: regression\nmodel: {name: logreg}\n"
    data = "data: {name: file, path: reg.h5, targets: values, num_clients: 4}\n"
    (tmp_path / "reg.yaml").write_text(base + data + "algorithm: {name: fedavg}\n", encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    "sets,line",
    [
        (["data.partition=shards"], "data.partition: shards deals out class labels"),
        (["data.partition=dirichlet"], "data.partition: dirichlet deals out class labels"),
        (["algorithm.weighting=label_kl"], "algorithm.weighting: label_kl weighs clients by class-label"),
        (["algorithm.name=ditto", "algorithm.weighting=label_kl"], "algorithm.weighting: label_kl"),
        (["task=classification"], "data.targets: values are real-valued targets: set task: regression"),
        (["task=auto"], "data.targets: values are real-valued targets: set task: regression"),
        (["data.targets=labels"], "data.path: y must hold integer class labels, got dtype float64"),
        (["data.targets=labels", "task=classification"], "data.path: y must hold integer class labels"),
        (["data.partition=iid"], "data.test_from: official test rows are dealt to iid clients by class"),
        (["algorithm.name=fedproto"], "task: fedproto trains with a cross-entropy of its own"),
    ],
)
def test_what_needs_class_labels_is_refused_in_one_line(in_tmp, capsys, sets, line):
    from pfl_mpi.cli import main

    assert main(["run", "reg.yaml"] + [a for s in sets for a in ("--set", s)]) == 2
    err = capsys.readouterr().err
    lines = [text for text in err.splitlines() if text.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"pfl-mpi: config error: {line}"), err
    assert not (in_tmp / "runs").exists()


def test_an_iid_split_of_values_with_client_held_out_tests_runs(in_tmp, capsys):
    from pfl_mpi.cli import main

    sets = ["data.partition=quantity", "data.test_from=client", "data.quantity_sigma=0.5"]
    assert main(["run", "reg.yaml"] + [a for s in sets for a in ("--set", s)]) == 0
    assert committed(in_tmp / "runs" / "reg.h5", "rounds", "test_mse").shape == (2,)
