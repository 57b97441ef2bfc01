"""Your own nn.Module under MPI (tests/plugins/user_models.py: a small ResNet with GroupNorm, one with
BatchNorm): FedAvg and FedPer with Adam and a cosine schedule give what one process gives, a run stopped after
two rounds resumes to the same end, and the exported state_dicts reproduce every client's recorded accuracy."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from mpi4py import MPI

from pfl_mpi.comm.mpi_world import MPIWorld
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.data import load_federated
from pfl_mpi.models import build_models
from pfl_mpi.report.models import export_models
from pfl_mpi.runtime import Engine
from pfl_mpi.store.writer import tables_under
from pfl_mpi.training.loop import evaluate

from ..helpers import committed, tiny_config

PLUGIN = Path(__file__).parents[1] / "plugins" / "user_models.py"
CASES = [
    ("fedavg", {"model.name": "user_models:resnet_gn", "model.width": 6}),  # GroupNorm: no buffers
    ("fedper", {"model.name": "tiny_resnet_bn", "model.width": 6}),  # BatchNorm: buffers shared, head fc personal
    ("fedavg", {"model.name": "tiny_resnet_bn", "model.buffers": "personal"}),  # FedBN's rule
]


def _config(out: Path, algorithm: str, rounds: int, sets: dict):
    # the cosine period is fixed: by default it is the run's rounds, which the resumed run changes
    adam = {"train.optimizer": "adam", "train.lr": 0.01, "train.batch_size": 16}
    adam.update({"train.schedule.name": "cosine", "train.schedule.period": 3, "train.schedule.min_factor": 0.1})
    return tiny_config(
        out, algorithm, plugins=f"[{PLUGIN}]", rounds=rounds, state_every=1, clients_per_round=4, **adam, **sets
    )


def _run(cfg, world, resume: bool = False) -> Engine:
    engine = Engine(cfg, world, resume=resume, show_progress=False)
    assert engine.run() == 0
    return engine


def _assert_same_run(a: Path, b: Path) -> None:
    for name in ("train_loss", "test_acc", "test_loss"):
        np.testing.assert_allclose(committed(a, "rounds", name), committed(b, "rounds", name), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(committed(a, "clients", "test_acc"), committed(b, "clients", "test_acc"), atol=1e-6)
    with h5py.File(a) as f, h5py.File(b) as g:
        for group in ("clients/state", "global/state"):
            tables = tables_under(f[group])
            assert set(tables) == set(tables_under(g[group]))
            for name, ds in tables.items():
                np.testing.assert_allclose(ds[...], g[group][name][...], atol=1e-5, err_msg=name)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm,sets", CASES, ids=["fedavg-groupnorm", "fedper-batchnorm", "fedavg-fedbn"])
def test_user_network_resumes_and_exports_what_it_recorded(algorithm, sets, mpi_tmp_path):
    world = MPIWorld()
    path = mpi_tmp_path / "resumed.h5"
    _run(_config(path, algorithm, 2, sets), world)  # stopped after two rounds
    engine = _run(_config(path, algorithm, 3, sets), world, resume=True)
    assert engine.start_round == 2
    if world.rank == 0:
        straight = _config(mpi_tmp_path / "straight.h5", algorithm, 3, sets)
        _run(straight, SerialWorld())
        _assert_same_run(path, straight.output_path)

        files, round = export_models(path, mpi_tmp_path / "nets")
        assert round == 2
        cfg = straight
        data = load_federated(cfg.data, cfg.seed)
        personal = algorithm == "fedper" or sets.get("model.buffers") == "personal"
        assert len(files) == 1 + (data.num_clients if personal else 0)
        net = build_models(cfg.model, data.input_shape, data.num_classes, cfg.seed + 7)[0]
        recorded = committed(path, "clients", "test_acc")[-1]
        for k in range(data.num_clients):
            name = f"client_{k}.pt" if personal else "global.pt"
            net.load_state_dict(torch.load(mpi_tmp_path / "nets" / name, weights_only=True))
            client = data.client(k)
            assert evaluate(net, client.x_test, client.y_test)[1] == recorded[k], k
    MPI.COMM_WORLD.Barrier()
