"""Data sets in their on-disk formats, run by the CLI under MPI: the paper configs (configs/papers/) on fixture
files give what one process gives, and the run file's partition shows the LEAF users and the official splits."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from pfl_mpi.cli import main
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.config import load_config
from pfl_mpi.runtime import Engine

from ..helpers import committed
from ..test_datasets_fixtures import (
    write_cifar10,
    write_cifar100,
    write_femnist,
    write_hf,
    write_shakespeare,
    write_split_file,
)

PAPERS = Path(__file__).parents[2] / "configs" / "papers"
SHORT = ["rounds=2", "eval_every=1", "state_every=2"]  # one snapshot (pFedHN's hypernetwork: seconds to write)
COMM = MPI.COMM_WORLD


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    """Every fixture, written once by rank 0 into a directory all ranks see."""
    path = tempfile.mkdtemp(prefix="pfl-datasets-") if COMM.Get_rank() == 0 else None
    path = Path(COMM.bcast(path, root=0))
    if COMM.Get_rank() == 0:
        write_cifar10(path / "cifar")
        write_cifar100(path / "cifar")
        write_femnist(path / "femnist")
        write_shakespeare(path / "shakespeare")
        write_hf(path)
        write_split_file(path / "own.h5")
        with h5py.File(path / "own.h5") as f:  # the same arrays as .npz, client ids and split as unicode strings
            np.savez(path / "own.npz", **{k: f[k][()].astype(str) if f[k].dtype.kind == "S" else f[k][()] for k in f})
        for suffix in ("h5", "npz"):
            (path / f"own-{suffix}.yaml").write_text(
                f"name: own-split-{suffix}\nseed: 0\nclients_per_round: 3\n"
                f"data: {{name: file, path: {path / f'own.{suffix}'}, num_clients: 5, min_samples: 2, "
                "eval_on: [val, test]}\n"
                "model: {name: mlp, hidden: [8]}\ntrain: {batch_size: 4}\nalgorithm: {name: fedper}\n",
                encoding="utf-8",
            )
        for layout in ("hf", "parquet"):  # save_to_disk, and the same splits as parquet files
            (path / f"{layout}.yaml").write_text(
                f"name: {layout}-fedper\nseed: 0\nclients_per_round: 3\n"
                f"data: {{name: hf, root: {path / layout}, num_clients: 4, min_samples: 2, "
                "hf: {x: img, client: who}}\n"
                "model: {name: cnn2d, cnn2d_fc: [16]}\ntrain: {batch_size: 4}\nalgorithm: {name: fedper}\n",
                encoding="utf-8",
            )
    COMM.Barrier()
    yield path
    COMM.Barrier()
    if COMM.Get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


FEWER = ["data.num_clients=10", "algorithm.inner_steps=5"]
CASES = {
    # 10 of the papers' 50 clients and 5 of pFedHN's 50 inner steps: the fixtures' batches, dealt as the papers do
    "cifar10-pfedhn": ("papers", ["data.root={root}/cifar", *FEWER]),
    "cifar100-pfedhn": ("papers", ["data.root={root}/cifar/cifar-100-python", *FEWER]),
    "cifar100-coarse": (
        "papers:cifar100-pfedhn",
        ["data.root={root}/cifar", "data.cifar100_labels=coarse", "data.classes_per_client=2", *FEWER],
    ),
    "femnist-fedavg": ("papers", ["data.root={root}/femnist", "data.num_clients=5", "data.max_clients=5"]),
    "shakespeare-fedavg": (
        "papers",
        ["data.root={root}/shakespeare", "data.num_clients=4", "data.max_clients=4", "clients_per_round=2"],
    ),
    "hf": ("root", []),
    "parquet": ("root", []),
    # files with string client ids and their own train/val/test split, evaluated on val and test
    "own-h5": ("root", []),
    "own-npz": ("root", []),
    "cifar10-augmented": (  # augmentation on, FedAvg on pFedHN's CNN: the same metrics on any number of ranks
        "papers:cifar10-pfedhn",
        [
            "data.root={root}/cifar",
            "algorithm={name: fedavg}",
            "clients_per_round=6",
            "data.augment={crop_padding: 4, flip: true}",
        ],
    ),
}


def _case(name: str, root: Path) -> tuple[Path, list[str]]:
    where, sets = CASES[name]
    config = root / f"{name}.yaml" if where == "root" else PAPERS / f"{where.partition(':')[2] or name}.yaml"
    return config, [*SHORT, *(s.replace("{root}", str(root)) for s in sets)]


def _cli_sets(sets: list[str]) -> list[str]:
    return [token for s in sets for token in ("--set", s)]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", sorted(CASES))
def test_dataset_config_under_mpi_like_one_process(name: str, root: Path) -> None:
    config, sets = _case(name, root)
    out = root / f"{name}-{COMM.Get_size()}.h5"
    assert main(["run", str(config), *_cli_sets(sets), "--out", str(out), "--quiet"]) == 0
    if COMM.Get_rank() == 0:
        one = load_config(config, [*sets, f"output={root / f'{name}-one.h5'}"])
        assert Engine(one, SerialWorld(), show_progress=False).run() == 0
        metrics = ["train_loss", "test_acc", "test_loss"] + (["val_acc", "val_loss"] if "own" in name else [])
        for metric in metrics:
            a, b = committed(out, "rounds", metric), committed(one.output_path, "rounds", metric)
            assert len(a) == 2 and np.isfinite(a).all()
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=metric)
        for metric in metrics[1:]:  # every client's held-out scores
            a, b = committed(out, "clients", metric), committed(one.output_path, "clients", metric)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"clients/{metric}")
        if "data.augment" in str(sets):  # augmentation is on: without it the same run trains otherwise
            plain = [s for s in sets if not s.startswith("data.augment")]
            off = load_config(config, [*plain, f"output={root / f'{name}-off.h5'}"])
            assert Engine(off, SerialWorld(), show_progress=False).run() == 0
            assert not np.allclose(
                committed(out, "rounds", "train_loss"), committed(off.output_path, "rounds", "train_loss")
            )
        with h5py.File(out) as f, h5py.File(one.output_path) as g:
            assert f.attrs["status"] == "completed" and f.attrs["world_size"] == COMM.Get_size()
            for column in ("train_sizes", "test_sizes", "label_histograms", "client_names", "val_sizes"):
                assert (column in f["partition"]) == (column in g["partition"])
                if column in f["partition"]:
                    np.testing.assert_array_equal(f["partition"][column][()], g["partition"][column][()])
    COMM.Barrier()


def _leaf_counts(folder: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        counts.update(zip(data["users"], data["num_samples"], strict=True))
    return counts


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", ["femnist-fedavg", "shakespeare-fedavg"])
def test_partition_table_shows_the_leaf_users_and_their_split(name: str, root: Path) -> None:
    config, sets = _case(name, root)
    out = root / f"{name}-partition-{COMM.Get_size()}.h5"
    assert main(["run", str(config), *_cli_sets(sets), "--out", str(out), "--quiet"]) == 0
    if COMM.Get_rank() == 0:
        leaf = root / name.split("-")[0]
        train, test = _leaf_counts(leaf / "train"), _leaf_counts(leaf / "test")
        with h5py.File(out) as f:
            users = [u.decode() for u in f["partition/client_names"][()]]
            kept = int(load_config(config, sets).data.num_clients)
            assert len(users) == kept and set(users) <= set(train)
            assert users == sorted(users, key=list(train).index)  # LEAF's order, sub-sampled by the data seed
            np.testing.assert_array_equal(f["partition/train_sizes"][()], [train[u] for u in users])
            np.testing.assert_array_equal(f["partition/test_sizes"][()], [test[u] for u in users])
    COMM.Barrier()


@pytest.mark.mpi(min_size=2)
def test_cifar_partition_has_the_official_split(root: Path) -> None:
    config, sets = _case("cifar10-pfedhn", root)
    out = root / f"cifar-partition-{COMM.Get_size()}.h5"
    assert main(["run", str(config), *_cli_sets(sets), "--out", str(out), "--quiet"]) == 0
    if COMM.Get_rank() == 0:
        with h5py.File(out) as f:
            train, test = f["partition/train_sizes"][()], f["partition/test_sizes"][()]
            hist = f["partition/label_histograms"][()]
            assert "client_names" not in f["partition"]  # CIFAR's clients are dealt, not named users
        assert train.sum() == 600 and test.sum() == 100  # the fixture's train batches and test batch, dealt whole
        assert ((hist > 0).sum(axis=1) == 2).all()
    COMM.Barrier()
