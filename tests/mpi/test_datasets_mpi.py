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
SHORT = ["rounds=2", "eval_every=1", "state_every=1"]
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
        (path / "own.yaml").write_text(
            "name: own-split\nseed: 0\nclients_per_round: 3\n"
            f"data: {{name: file, path: {path / 'own.h5'}, num_clients: 5, min_samples: 2, eval_split: val}}\n"
            "model: {name: mlp, hidden: [8]}\ntrain: {batch_size: 4}\nalgorithm: {name: fedper}\n",
            encoding="utf-8",
        )
        (path / "hf.yaml").write_text(
            "name: hf-fedper\nseed: 0\nclients_per_round: 3\n"
            f"data: {{name: hf, root: {path / 'hf'}, num_clients: 4, min_samples: 2, hf: {{x: img, client: who}}}}\n"
            "model: {name: cnn2d, cnn2d_fc: [16]}\ntrain: {batch_size: 4}\nalgorithm: {name: fedper}\n",
            encoding="utf-8",
        )
    COMM.Barrier()
    yield path
    COMM.Barrier()
    if COMM.Get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


CASES = {
    "cifar10-pfedhn": ("papers", ["data.root={root}/cifar"]),
    "cifar100-pfedhn": ("papers", ["data.root={root}/cifar/cifar-100-python"]),
    "femnist-fedavg": ("papers", ["data.root={root}/femnist", "data.num_clients=5", "data.max_clients=5"]),
    "shakespeare-fedavg": (
        "papers",
        ["data.root={root}/shakespeare", "data.num_clients=4", "data.max_clients=4", "clients_per_round=2"],
    ),
    "hf": ("root", []),
    "own": ("root", []),  # a file with string client ids and its own train/val/test split, evaluated on val
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
        for metric in ("train_loss", "test_acc", "test_loss"):
            a, b = committed(out, "rounds", metric), committed(one.output_path, "rounds", metric)
            assert len(a) == 2 and np.isfinite(a).all()
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=metric)
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
