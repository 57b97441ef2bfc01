"""The paper configs (configs/papers/) validate, build against fixture files, and the augmented ResNet-18 one runs."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from pfl_mpi.cli import main
from pfl_mpi.config import load_config
from pfl_mpi.data import load_federated
from pfl_mpi.runtime.build import check_buildable

from .test_datasets_fixtures import write_cifar10, write_cifar100, write_femnist, write_shakespeare

PAPERS = sorted((Path(__file__).parents[1] / "configs" / "papers").glob("*.yaml"))
DATA = {"cifar10": "cifar", "cifar100": "cifar", "femnist": "femnist", "shakespeare": "shakespeare"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("papers")
    write_cifar10(path / "cifar")
    write_cifar100(path / "cifar")
    write_femnist(path / "femnist")
    write_shakespeare(path / "shakespeare")
    return path


def _fixture_sets(config: Path, root: Path) -> list[str]:
    name = load_config(config).data.name
    sets = [f"data.root={root / DATA[name]}"]
    if name in ("femnist", "shakespeare"):  # the fixtures' user counts
        users = 8 if name == "femnist" else 6
        sets += [f"data.num_clients={users}", f"data.max_clients={users}", "clients_per_round=2"]
    if name == "cifar10" and load_config(config).data.num_clients > 50:  # 600 fixture images: at most 60 clients
        sets += ["data.num_clients=20", "clients_per_round=1"]
    return sets


def test_there_are_paper_configs_for_every_data_set() -> None:
    names = {load_config(c).data.name for c in PAPERS}
    assert names == {"cifar10", "cifar100", "femnist", "shakespeare"}


@pytest.mark.parametrize("config", PAPERS, ids=[c.stem for c in PAPERS])
def test_paper_config_validates_and_builds_on_fixture_files(config: Path, root: Path) -> None:
    cfg = load_config(config, _fixture_sets(config, root))
    data = load_federated(cfg.data, cfg.seed)
    check_buildable(cfg, data)  # what pfl-mpi run checks before MPI starts
    assert data.num_clients == cfg.data.num_clients and (data.test_sizes > 0).all()
    text = config.read_text()
    assert "Reported" in text and "GPU cluster" in text  # the paper's numbers and how to reproduce them


def test_resnet18_config_with_augmentation_runs_two_rounds(root: Path, tmp_path: Path) -> None:
    config = Path(__file__).parents[1] / "configs" / "papers" / "cifar10-fedavg-resnet18.yaml"
    sets = [*_fixture_sets(config, root), "rounds=2", "eval_every=2"]
    cfg = load_config(config, sets)
    assert load_federated(cfg.data, cfg.seed).augment is not None
    out = tmp_path / "r.h5"
    assert main(["run", str(config), *[t for s in sets for t in ("--set", s)], "--out", str(out), "--quiet"]) == 0
    with h5py.File(out) as f:
        assert f.attrs["rounds_completed"] == 2
        assert np.isfinite(f["rounds/train_loss"][:2]).all() and 0 <= f["rounds/test_acc"][1] <= 1
