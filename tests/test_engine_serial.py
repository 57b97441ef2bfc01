"""The round loop in one process (SerialWorld): results checked against independent computations."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pfl_mpi.comm import LABELS
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.config import RunConfig, validate
from pfl_mpi.data import load_federated
from pfl_mpi.models import build_model
from pfl_mpi.runtime import Engine
from pfl_mpi.runtime.placement import sample_clients
from pfl_mpi.seeding import client_generator
from pfl_mpi.store import read_clients, read_comm, read_summary


def _cfg(tmp_path, name="run", **sections) -> RunConfig:
    raw = {
        "name": name,
        "seed": 3,
        "rounds": 2,
        "clients_per_round": 4,
        "device": "cpu",
        "output": str(tmp_path / f"{name}.h5"),
        "data": {"name": "digits", "num_clients": 10, "partition": "iid"},
        "model": {"name": "logreg"},
        "train": {"local_epochs": 2, "batch_size": 16, "lr": 0.1},
        "algorithm": {"name": "fedavg"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return validate(raw)


def _run(cfg: RunConfig, resume: bool = False) -> Engine:
    engine = Engine(cfg, SerialWorld(), resume=resume, show_progress=False)
    assert engine.run() == 0
    return engine


def _initial_params(cfg: RunConfig, data) -> dict[str, torch.Tensor]:
    """The initial model: built under the run seed (the documented contract of build_model)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _logreg_sgd(params: dict[str, torch.Tensor], x, y, cfg: RunConfig, generators) -> dict[str, torch.Tensor]:
    """Plain minibatch SGD on multinomial logistic regression, written out by hand.

    ``generators``: one torch.Generator per round; each epoch draws one permutation from it.
    """
    (wname, w), (bname, b) = params.items()
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    n, bs, lr = x.shape[0], cfg.train.batch_size, cfg.train.lr
    xf = x.reshape(n, -1)
    for g in generators:
        for _ in range(cfg.train.local_epochs):
            order = torch.randperm(n, generator=g)
            for start in range(0, n, bs):
                idx = order[start : start + bs]
                loss = F.cross_entropy(xf[idx] @ w.T + b, y[idx])
                gw, gb = torch.autograd.grad(loss, (w, b))
                with torch.no_grad():
                    w -= lr * gw
                    b -= lr * gb
    return {wname: w.detach(), bname: b.detach()}


def _flat(params: dict[str, torch.Tensor]) -> np.ndarray:
    return torch.cat([p.reshape(-1) for p in params.values()]).double().numpy()


# -- FedAvg -----------------------------------------------------------------------------------


def test_fedavg_first_round_matches_sequential_computation(tmp_path):
    # quantity skew: client sizes differ a lot, so weighting by train sizes matters
    cfg = _cfg(tmp_path, rounds=1, data={"partition": "quantity"})
    _run(cfg)

    data = load_federated(cfg.data, cfg.seed)
    w0 = _initial_params(cfg, data)
    assert list(w0) == ["head.fc1.weight", "head.fc1.bias"]
    clients = sample_clients(cfg.seed, 0, cfg.data.num_clients, cfg.clients_per_round)
    deltas, weights = [], []
    for k in clients:
        d = data.client(int(k))
        trained = _logreg_sgd(w0, d.x_train, d.y_train, cfg, [client_generator(cfg.seed, int(k), 0)])
        deltas.append(_flat(trained) - _flat(w0))
        weights.append(d.y_train.shape[0])
    weights = np.asarray(weights, dtype=np.float64)
    assert weights.max() > 1.5 * weights.min()
    expected = _flat(w0) + (weights[:, None] * np.stack(deltas)).sum(0) / weights.sum()

    with h5py.File(cfg.output_path, "r") as f:
        np.testing.assert_array_equal(f["partition/train_sizes"][...][clients], weights)
        np.testing.assert_array_equal(np.flatnonzero(f["clients/participated"][0]), clients)
        checkpoint_w = f["checkpoint/slot0/server/w"][...]
        assert int(f["checkpoint/slot0"].attrs["round"]) == 0
        final = f["global/state/shared"][-1]
        np.testing.assert_array_equal(f["global/state/round"][...], [0])
    assert not np.allclose(expected, _flat(w0), atol=1e-3)  # the round did move the model
    np.testing.assert_allclose(checkpoint_w, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(final, expected, rtol=0, atol=1e-6)


def test_train_loss_is_weighted_mean_over_participants(tmp_path):
    cfg = _cfg(tmp_path, rounds=3)
    _run(cfg)
    rounds = read_summary(cfg.output_path).rounds
    part = read_clients(cfg.output_path, "participated").astype(bool)
    losses = read_clients(cfg.output_path, "train_loss").astype(np.float64)
    with h5py.File(cfg.output_path, "r") as f:
        sizes = f["partition/train_sizes"][...].astype(np.float64)
    assert part.shape == losses.shape == (3, cfg.data.num_clients)
    for t in range(3):
        p = part[t]
        assert p.sum() == cfg.clients_per_round
        np.testing.assert_array_equal(np.flatnonzero(p), sample_clients(cfg.seed, t, cfg.data.num_clients, 4))
        assert np.all(np.isnan(losses[t, ~p])) and np.all(np.isfinite(losses[t, p]))
        expected = np.sum(sizes[p] * losses[t, p]) / np.sum(sizes[p])
        assert rounds["train_loss"][t] == pytest.approx(expected, rel=1e-6)


def test_test_metrics_are_weighted_over_all_clients(tmp_path):
    cfg = _cfg(tmp_path, rounds=2)
    _run(cfg)
    rounds = read_summary(cfg.output_path).rounds
    acc = read_clients(cfg.output_path, "test_acc").astype(np.float64)
    with h5py.File(cfg.output_path, "r") as f:
        n_test = f["partition/test_sizes"][...].astype(np.float64)
    for t in range(2):
        assert np.all(np.isfinite(acc[t]))
        assert rounds["test_acc"][t] == pytest.approx(np.sum(n_test * acc[t]) / n_test.sum(), rel=1e-6)
        assert rounds["test_acc_mean"][t] == pytest.approx(acc[t].mean(), rel=1e-6)


def test_read_comm_of_an_engine_file(tmp_path):
    cfg = _cfg(tmp_path, rounds=2)
    _run(cfg)
    labels, comm = read_comm(cfg.output_path)
    assert labels == list(LABELS)
    assert comm["calls"].shape == (2, 1, len(LABELS))


def test_file_attributes(tmp_path):
    cfg = _cfg(tmp_path, rounds=2)
    _run(cfg)
    s = read_summary(cfg.output_path)
    assert s.rounds_completed == 2
    assert s.attrs["status"] == "completed"
    assert s.attrs["algorithm"] == "fedavg"
    assert s.attrs["world_size"] == 1
    assert s.attrs["rounds_planned"] == 2
    assert validate(__import__("yaml").safe_load(s.attrs["config"])) == cfg
    np.testing.assert_array_equal(s.rounds["round"], [0, 1])
    assert np.all(s.rounds["num_sampled"] == 4)


# -- FedPer -----------------------------------------------------------------------------------


def test_fedper_keeps_heads_personal(tmp_path):
    cfg = _cfg(
        tmp_path,
        rounds=2,
        state_every=1,
        model={"name": "mlp", "hidden": [8], "head_layers": 1},
        algorithm={"name": "fedper"},
    )
    _run(cfg)
    data = load_federated(cfg.data, cfg.seed)
    init = _initial_params(cfg, data)
    base_numel = sum(p.numel() for n, p in init.items() if n.startswith("base."))
    head_numel = sum(p.numel() for n, p in init.items() if n.startswith("head."))
    init_head = _flat({n: p for n, p in init.items() if n.startswith("head.")})
    init_base = _flat({n: p for n, p in init.items() if n.startswith("base.")})
    assert base_numel == 8 * 64 + 8 and head_numel == 10 * 8 + 10

    with h5py.File(cfg.output_path, "r") as f:
        shared = f["global/state/shared"][...]
        heads = f["clients/state/personal"][...].astype(np.float64)
        np.testing.assert_array_equal(f["global/state/round"][...], [0, 1])
        server_w = f["checkpoint/slot1/server/w"][...]
    assert shared.shape == (2, base_numel)  # only base parameters are global
    assert server_w.shape == (base_numel,)
    assert not np.allclose(shared[0], init_base)
    assert heads.shape == (2, cfg.data.num_clients, head_numel)

    trained = sample_clients(cfg.seed, 0, cfg.data.num_clients, 4)
    idle = np.setdiff1d(np.arange(cfg.data.num_clients), trained)
    # after round 1: clients that did not train keep the initial head, exactly
    np.testing.assert_array_equal(heads[0, idle], np.broadcast_to(init_head, (len(idle), head_numel)))
    # those that trained have heads of their own, different from the initial one and from each other
    for i, k in enumerate(trained):
        assert not np.allclose(heads[0, k], init_head)
        for j in trained[i + 1 :]:
            assert not np.allclose(heads[0, k], heads[0, j])
    # round 2 changes exactly the heads of round 2's clients
    again = sample_clients(cfg.seed, 1, cfg.data.num_clients, 4)
    for k in range(cfg.data.num_clients):
        if k in again:
            assert not np.allclose(heads[1, k], heads[0, k])
        else:
            np.testing.assert_array_equal(heads[1, k], heads[0, k])


# -- Local ------------------------------------------------------------------------------------


def test_local_trains_each_client_alone(tmp_path):
    cfg = _cfg(tmp_path, rounds=2, clients_per_round=None, data={"num_clients": 8}, algorithm={"name": "local"})
    _run(cfg)
    s = read_summary(cfg.output_path)
    np.testing.assert_array_equal(s.rounds["bytes_down"], [0.0, 0.0])
    np.testing.assert_array_equal(s.rounds["bytes_up"], [0.0, 0.0])

    data = load_federated(cfg.data, cfg.seed)
    init = _initial_params(cfg, data)
    numel = sum(p.numel() for p in init.values())
    with h5py.File(cfg.output_path, "r") as f:
        states = f["clients/state/model"][-1].astype(np.float64)
        assert set(f["global/state"]) == {"round"}  # no global model
    assert states.shape == (8, numel)
    for k in range(8):
        for j in range(k + 1, 8):
            assert not np.allclose(states[k], states[j])
    # each client's model is two rounds of its own SGD from the common initial model
    for k in (0, 5):
        d = data.client(k)
        gens = [client_generator(cfg.seed, k, t) for t in range(2)]
        expected = _flat(_logreg_sgd(init, d.x_train, d.y_train, cfg, gens))
        np.testing.assert_allclose(states[k], expected, rtol=0, atol=1e-6)


# -- resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "algorithm,model",
    [
        ({"name": "fedavg", "server_opt": {"name": "adam", "lr": 0.05}}, {"name": "logreg"}),
        ({"name": "fedper"}, {"name": "mlp", "hidden": [8]}),
        ({"name": "local"}, {"name": "logreg"}),
    ],
    ids=["fedavg-adam", "fedper", "local"],
)
def test_resume_equals_a_straight_run(tmp_path, algorithm, model):
    straight = _cfg(tmp_path, name="straight", rounds=4, algorithm=algorithm, model=model)
    _run(straight)
    first = _cfg(tmp_path, name="resumed", rounds=2, algorithm=algorithm, model=model)
    _run(first)
    assert read_summary(first.output_path).rounds_completed == 2
    rest = _cfg(tmp_path, name="resumed", rounds=4, algorithm=algorithm, model=model)
    engine = _run(rest, resume=True)
    assert engine.start_round == 2

    a, b = read_summary(straight.output_path), read_summary(rest.output_path)
    assert b.rounds_completed == 4 and b.attrs["status"] == "completed"
    for metric in ("test_acc", "test_loss", "train_loss"):
        np.testing.assert_allclose(b.rounds[metric], a.rounds[metric], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(
        read_clients(rest.output_path, "participated"), read_clients(straight.output_path, "participated")
    )
    with h5py.File(straight.output_path, "r") as fa, h5py.File(rest.output_path, "r") as fb:
        assert set(fa["global/state"]) == set(fb["global/state"])
        assert fb["global/state/round"][-1] == 3
        for name in fa["global/state"]:
            np.testing.assert_allclose(fb["global/state"][name][-1], fa["global/state"][name][-1], rtol=0, atol=1e-6)
        for name in fa["clients/state"]:
            np.testing.assert_allclose(fb["clients/state"][name][-1], fa["clients/state"][name][-1], rtol=0, atol=1e-6)
        for name in fa["checkpoint/slot1/server"]:
            np.testing.assert_allclose(
                fb["checkpoint/slot1/server"][name][...], fa["checkpoint/slot1/server"][name][...], rtol=0, atol=1e-6
            )


# -- divergence -------------------------------------------------------------------------------


def test_divergence_stops_with_exit_3_and_keeps_completed_rounds(tmp_path):
    from pfl_mpi.runtime import EXIT_DIVERGED

    cfg = _cfg(tmp_path, rounds=3, train={"lr": 1e30}, model={"name": "mlp", "hidden": [8]})
    engine = Engine(cfg, SerialWorld(), show_progress=False)
    assert engine.run() == EXIT_DIVERGED
    assert "round 1" in str(engine.divergence)
    s = read_summary(cfg.output_path)
    assert s.rounds_completed == 0
    assert s.attrs["status"] == "diverged"
