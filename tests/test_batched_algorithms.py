"""Algorithms that opt in to batched clients (``train.client_batch``): a run with blocks of clients equals the
sequential run to float tolerance, records the K it used, and resumes bit for bit."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.runtime import Engine
from pfl_mpi.training import blocks as client_blocks

from .helpers import committed, tiny_config

OPTED_IN = {  # algorithm -> its overrides: the features its client step batches
    "fedavg": {"train.momentum": 0.5, "data.num_clients": 12, "clients_per_round": 9},
    "fedper": {},
    "lgfedavg": {},
    "fedprox": {"algorithm.mu": 0.3, "algorithm.straggler_fraction": 0.5, "train.local_epochs": 3},
    "fedprox-dropping": {"algorithm.straggler_fraction": 0.5, "algorithm.drop_stragglers": True},
    "local": {"train.weight_decay": 0.01},
    "fedrep": {"algorithm.tau_h": 2, "algorithm.tau_b": 1},
    "ditto": {"algorithm.lam": 0.5, "algorithm.personal_epochs": 2},
    "qsgd": {},
    "topk": {"algorithm.k": 40},
    "signsgd": {},
    "fetchsgd": {},
    "robust": {},
    "fedamp": {"algorithm.lambda": 0.5, "algorithm.start": "personal"},
}


def _cfg(case: str, out, client_batch, rounds: int = 3):
    algorithm = case.split("-")[0]
    sets = {"train.client_batch": client_batch, "rounds": rounds, "data.partition": "dirichlet", **OPTED_IN[case]}
    return tiny_config(out, algorithm, **sets)


def _run(cfg, resume: bool = False) -> Engine:
    engine = Engine(cfg, SerialWorld(), resume=resume, show_progress=False)
    assert engine.run() == 0
    return engine


def _states(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        out = {f"global/{k}": f["global/state"][k][...] for k in f["global/state"] if k != "round"}
        out.update({f"clients/{k}": f["clients/state"][k][...] for k in f["clients/state"] if k != "round"})
    return out


@pytest.fixture
def batched_clients(monkeypatch) -> list[int]:
    """The sizes of the blocks the batched loop trained (it is really used, not a fallback)."""
    sizes: list[int] = []
    train = client_blocks.batched_local_training

    def counting(model, params, data, *args, **kwargs):
        sizes.append(len(data))
        return train(model, params, data, *args, **kwargs)

    monkeypatch.setattr(client_blocks, "batched_local_training", counting)
    return sizes


@pytest.mark.parametrize("case", OPTED_IN)
def test_blocks_of_clients_equal_the_sequential_run(tmp_path, case, batched_clients):
    sequential = _run(_cfg(case, tmp_path / "one.h5", 1))
    assert batched_clients == []
    batched = _run(_cfg(case, tmp_path / "blocks.h5", 4))
    assert batched.algo.setup.client_batch == 4 and sequential.algo.setup.client_batch == 1
    assert max(batched_clients) > 1
    for name in ("train_loss", "test_loss", "test_acc"):
        a, b = committed(tmp_path / "blocks.h5", "rounds", name), committed(tmp_path / "one.h5", "rounds", name)
        np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=name)
    for name in sequential.algo.client_metrics:
        a, b = committed(tmp_path / "blocks.h5", "clients", name), committed(tmp_path / "one.h5", "clients", name)
        np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=name)
    one, blocks = _states(tmp_path / "one.h5"), _states(tmp_path / "blocks.h5")
    assert set(one) == set(blocks)
    for name, value in one.items():
        np.testing.assert_allclose(blocks[name], value, rtol=1e-5, atol=1e-6 * np.abs(value).max(), err_msg=name)
    with h5py.File(tmp_path / "blocks.h5") as f:
        assert f.attrs["client_batch"] == 4


@pytest.mark.parametrize("case", OPTED_IN)
def test_a_batched_run_resumes_bit_for_bit(tmp_path, case):
    _run(_cfg(case, tmp_path / "straight.h5", 3))
    _run(_cfg(case, tmp_path / "resumed.h5", 3, rounds=2))
    assert _run(_cfg(case, tmp_path / "resumed.h5", 3), resume=True).start_round == 2
    for name in ("train_loss", "test_acc"):
        a, b = committed(tmp_path / "resumed.h5", "rounds", name), committed(tmp_path / "straight.h5", "rounds", name)
        np.testing.assert_array_equal(a, b, err_msg=name)
    straight, resumed = _states(tmp_path / "straight.h5"), _states(tmp_path / "resumed.h5")
    for name, value in straight.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def test_auto_records_the_k_it_chose(tmp_path):
    engine = _run(_cfg("fedavg", tmp_path / "auto.h5", "auto", rounds=1))
    with h5py.File(tmp_path / "auto.h5") as f:
        assert f.attrs["client_batch"] == engine.algo.setup.client_batch > 1


def test_what_the_batched_loop_cannot_run_trains_sequentially(tmp_path, batched_clients):
    """Adam is not batched: with client_batch 4 every client trains alone, exactly as with client_batch 1."""
    _run(tiny_config(tmp_path / "one.h5", "fedavg", **{"train.optimizer": "adam", "train.lr": 0.01}))
    _run(
        tiny_config(
            tmp_path / "four.h5", "fedavg", **{"train.optimizer": "adam", "train.lr": 0.01, "train.client_batch": 4}
        )
    )
    assert batched_clients == []
    for name in ("train_loss", "test_acc"):
        a, b = committed(tmp_path / "four.h5", "rounds", name), committed(tmp_path / "one.h5", "rounds", name)
        np.testing.assert_array_equal(a, b, err_msg=name)
    with h5py.File(tmp_path / "four.h5") as f:
        assert f.attrs["client_batch"] == 4
        assert f.attrs["client_batch_use"] == "evaluation; training one client at a time: optimizer adam"


@pytest.mark.parametrize(
    ("algorithm", "k", "use"),
    [
        ("fedavg", 4, "training and evaluation"),
        ("perfedavg", 4, "evaluation; training one client at a time: perfedavg trains its clients one after another"),
        ("fedproto", 1, "nothing: fedproto trains its clients one after another"),
    ],
)
def test_the_file_records_what_ran_in_blocks(tmp_path, batched_clients, algorithm, k, use):
    """K and what used it, as ran: an algorithm that trains its clients one by one has no training block."""
    _run(tiny_config(tmp_path / "run.h5", algorithm, rounds=1, **{"train.client_batch": 4}))
    with h5py.File(tmp_path / "run.h5") as f:
        assert (f.attrs["client_batch"], f.attrs["client_batch_use"]) == (k, use)
    assert (batched_clients != []) == use.startswith("training")


def test_after_a_block_the_model_holds_its_own_tensors_and_the_last_clients_parameters(tmp_path, monkeypatch):
    """While a block runs the model shows each client's trained slice of the block (no copy); afterwards its
    parameters are their own tensors again, holding what the last client's steps left in the model."""
    checked: list[bool] = []
    train_in_blocks = client_blocks.train_in_blocks

    def checking(algo, clients, payloads):
        model = algo.setup.model_for(clients[0].id)
        own = [p.data_ptr() for p in model.parameters()]
        last: list = []
        finish = algo.finish_training

        def keeping(client, payload, means):  # what the model shows to the client's last step
            last[:] = [p.detach().clone() for p in model.parameters()]
            return finish(client, payload, means)

        monkeypatch.setattr(algo, "finish_training", keeping)
        updates = list(train_in_blocks(algo, clients, payloads))
        assert [p.data_ptr() for p in model.parameters()] == own
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), last, strict=True))
        checked.append(True)
        yield from updates

    monkeypatch.setattr(client_blocks, "train_in_blocks", checking)
    _run(_cfg("fedavg", tmp_path / "blocks.h5", 4, rounds=2))
    assert checked == [True, True]
