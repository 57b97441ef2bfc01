"""FedGKT: what moves (per-sample features, logits and labels up; the server's logits down), the server's training
on the gathered features, the clients' distillation from the server's logits in sample order, resume, the ledger.

Expected values are computed here independently: the server step with torch.optim on a copy of the server model
and torch's kl_div, the client step with torch.optim.SGD on a copy of the client's model, sizes from the formula.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pfl_mpi.algorithms import Client, Collected, Setup, resolve
from pfl_mpi.algorithms.fedgkt import _SERVER_ORDER
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.data import load_federated
from pfl_mpi.errors import ConfigError
from pfl_mpi.models import build_models
from pfl_mpi.runtime import Engine
from pfl_mpi.runtime.build import check_buildable
from pfl_mpi.seeding import client_generator, derive_seed
from pfl_mpi.store import read_client_states, read_clients
from pfl_mpi.store.nested import flatten_state, unflatten_state

from .helpers import RecordingWorld, committed, tiny_config

C = 10  # digits classes
D = 16  # features of both test architectures
TWO = "[{name: mlp, hidden: [16]}, {name: cnn2d, cnn2d_channels: 2, cnn2d_fc: []}]"  # d = 16 and 2 * 2 * 2 * 2 = 16
SMALL = {"algorithm.server_hidden": "[32]", "algorithm.epochs_server": 2}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as the runtime runs by default (``threads: 1``); conftest restores the session's count.
    Small models on a shared, loaded machine run many times slower on more threads."""
    torch.set_num_threads(1)


def _config(out, **overrides):
    """tiny_config with fedgkt, an MLP and a CNN client model (both 16 features), a small server model."""
    sets = {"model.architectures": TWO, "model.assignment": "round_robin", **SMALL, **overrides}
    return tiny_config(out, "fedgkt", **sets)


def _build(cfg, **params):
    """(algorithm, data) as every rank builds them, the server initialised."""
    data = load_federated(cfg.data, cfg.seed)
    models = build_models(cfg.model, data.input_shape, data.num_classes, cfg.seed)
    cls, p = resolve({**cfg.algorithm, **params})
    groups = cfg.model.groups(data.num_clients)
    setup = Setup(
        models[0],
        torch.device("cpu"),
        cfg.train,
        data.num_clients,
        data.num_classes,
        cfg.seed,
        models=models,
        groups=groups,
        train_sizes=data.train_sizes,
        test_sizes=data.test_sizes,
    )
    algo = cls(p, setup)
    algo.init_server()
    return algo, data


def _client(algo, data, states, k: int, t: int) -> Client:
    states.setdefault(k, algo.init_client_state(k))
    return Client(k, t, data.client(k), states[k], client_generator(algo.setup.seed, k, t))


def _round(algo, data, states, clients, t):
    """Round t for ``clients``: (downlink payloads, uplink rows, server metrics)."""
    down = algo.downlink(t, clients, "train")
    updates = [
        algo.client_update(_client(algo, data, states, k, t), d.clone()) for k, d in zip(clients, down, strict=True)
    ]
    rows = [u.payload for u in updates]
    metrics = algo.aggregate(t, Collected(list(clients), None, torch.ones(len(clients)), rows))
    return down, rows, metrics


def _model_of(algo, states, k):
    """A copy of client k's model holding its current state."""
    model = copy.deepcopy(algo.setup.model_for(k))
    algo.personal.layouts[algo.setup.group_of(k)].load(model, states[k]["model"])
    return model


def _torch_kd(student, teacher, temperature):
    """The authors' KL_Loss without their 1e-7: T^2 * KLDivLoss(batchmean)(log_softmax(s/T), softmax(t/T))."""
    log_q = F.log_softmax(student / temperature, dim=1)
    return temperature**2 * F.kl_div(log_q, F.softmax(teacher / temperature, dim=1), reduction="batchmean")


# -- what moves ---------------------------------------------------------------------------------------


def test_uplink_bytes_scale_with_samples_not_parameters(tmp_path):
    """Two client models whose sizes differ 30-fold with one feature size send the same bytes; two clients of
    different sizes send bytes by their samples: n_k (d + C + 1) + m_k (d + 1) float32 for n_k training and m_k
    test samples (without the test rows, ``server_test: false``, in the ratio of their training samples)."""
    sets = {"data.partition": "quantity", "model.head_layers": 1}
    payloads, numels = {}, {}
    for width in (4, 512):
        cfg = tiny_config(tmp_path / "x.h5", "fedgkt", **{"model.hidden": f"[{width}, {D}]", **SMALL, **sets})
        algo, data = _build(cfg)
        sizes, tests = data.train_sizes, data.test_sizes
        a, b = int(np.argmin(sizes)), int(np.argmax(sizes))
        assert sizes[b] > 2 * sizes[a] and tests[a] > 0
        numels[width] = algo.personal.layouts[0].numel
        _, rows, _ = _round(algo, data, {}, [a, b], t=0)
        payloads[width] = [r.numel() * r.element_size() for r in rows]
        for k, row in zip((a, b), rows, strict=True):
            expected = sizes[k] * (D + C + 1) + tests[k] * (D + 1)
            assert row.dtype == torch.float32 and row.numel() == algo.up_numel_of(k) == expected
    assert numels[512] > 30 * numels[4]
    assert payloads[4] == payloads[512] == [4 * int(sizes[k] * (D + C + 1) + tests[k] * (D + 1)) for k in (a, b)]
    algo, data = _build(cfg, server_test=False)
    _, rows, _ = _round(algo, data, {}, [a, b], t=0)
    expected = [int(sizes[k]) * (D + C + 1) for k in (a, b)]
    assert [r.numel() for r in rows] == [algo.up_numel_of(k) for k in (a, b)] == expected
    assert rows[1].numel() / rows[0].numel() == pytest.approx(sizes[b] / sizes[a])


def test_each_client_sends_features_logits_and_labels_of_every_training_sample_in_order(tmp_path):
    cfg = _config(tmp_path / "x.h5")
    algo, data = _build(cfg)
    states = {}
    _, rows, _ = _round(algo, data, states, [2, 3], t=0)  # an MLP client and a CNN client
    for k, row in zip((2, 3), rows, strict=True):
        x, y = data.client(k).x_train, data.client(k).y_train
        x_test, y_test = data.client(k).x_test, data.client(k).y_test
        model = _model_of(algo, states, k).eval()
        with torch.no_grad():
            features = model.base(x)
            expected = torch.cat([features, model(x), y.float()[:, None]], dim=1)
            expected_test = torch.cat([model.base(x_test), y_test.float()[:, None]], dim=1)
        train, test = row[: len(y) * (D + C + 1)], row[len(y) * (D + C + 1) :]
        np.testing.assert_allclose(train.reshape(len(y), D + C + 1).numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(test.reshape(len(y_test), D + 1).numpy(), expected_test.numpy(), atol=1e-6)


# -- the server ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("optimizer", "lr", "server_alpha"),
    [("adam", 0.01, 1.0), ("adam", 0.01, 0.0), ("sgd", 0.05, 0.5)],
    ids=["adam", "adam-ce-only", "sgd"],
)
def test_the_server_model_trains_on_the_gathered_features(tmp_path, optimizer, lr, server_alpha):
    """The server's epochs, recomputed with torch.optim on a copy of its model: the round's rows in client id order,
    one permutation per epoch from the round's stream, CE + server_alpha * KL_T(client logits || server logits)."""
    params = {"server_optimizer": optimizer, "server_lr": lr, "server_alpha": server_alpha, "epochs_server": 3}
    params["temperature"] = 2.0
    cfg = _config(tmp_path / "x.h5", **{f"algorithm.{k}": v for k, v in params.items()})
    algo, data = _build(cfg)
    p, t = algo.params, 4
    clients = [1, 4, 7]  # in client id order, as the transport delivers a Gathered uplink
    states = {}
    down = algo.downlink(t, clients, "train")
    rows = [
        algo.client_update(_client(algo, data, states, k, t), d).payload for k, d in zip(clients, down, strict=True)
    ]
    reference = copy.deepcopy(algo.server)
    if optimizer == "adam":
        opt = torch.optim.Adam(reference.parameters(), lr=p.server_lr, weight_decay=p.server_weight_decay, amsgrad=True)
    else:
        opt = torch.optim.SGD(
            reference.parameters(),
            lr=p.server_lr,
            momentum=p.server_momentum,
            nesterov=True,
            weight_decay=p.server_weight_decay,
        )
    n = {k: int(data.train_sizes[k]) * (D + C + 1) for k in clients}  # the training rows (the test rows follow)
    table = torch.cat([rows[clients.index(k)][: n[k]].reshape(-1, D + C + 1) for k in sorted(clients)])
    h, z, y = table[:, :D], table[:, D : D + C], table[:, D + C].long()
    with torch.no_grad():
        ce_before = float(F.cross_entropy(reference(h), y))

    metrics = algo.aggregate(t, Collected(clients, None, torch.ones(3), rows))

    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, _SERVER_ORDER, t))
    for _ in range(p.epochs_server):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), p.server_batch_size):
            idx = order[start : start + p.server_batch_size]
            out = reference(h[idx])
            loss = F.cross_entropy(out, y[idx]) + server_alpha * _torch_kd(out, z[idx], p.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for mine, theirs in zip(algo.server.parameters(), reference.parameters(), strict=True):
        np.testing.assert_allclose(mine.detach().numpy(), theirs.detach().numpy(), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        ce_after = float(F.cross_entropy(algo.server(h), y))
        accuracy = float((algo.server(h).argmax(1) == y).float().mean())
    assert ce_after < 0.8 * ce_before
    assert metrics["uplink_samples"] == len(y) == sum(int(data.train_sizes[k]) for k in clients)
    assert metrics["server_acc"] == pytest.approx(accuracy)


def test_the_servers_logits_reach_the_right_clients_in_sample_order(tmp_path):
    """After a round, the server's logits on client k's features go to k alone, row i for training sample i;
    a client not trained yet gets flag 0 and zeros."""
    cfg = _config(tmp_path / "x.h5")
    algo, data = _build(cfg)
    states = {}
    _round(algo, data, states, [0, 3, 5], t=0)
    down = algo.downlink(1, [5, 6, 0], "train")
    assert [d.numel() for d in down] == [int(data.train_sizes[k]) * C + 1 for k in (5, 6, 0)]
    assert float(down[1][0]) == 0 and not down[1].any()  # client 6 never trained
    algo.server.eval()
    for k, payload in zip((5, 0), (down[0], down[2]), strict=True):
        assert float(payload[0]) == 1
        features = _model_of(algo, states, k).eval().base(data.client(k).x_train)
        with torch.no_grad():
            expected = algo.server(features)
        np.testing.assert_allclose(payload[1:].reshape(-1, C).numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_a_client_distils_from_the_server_logits_of_each_batchs_own_samples(tmp_path):
    """The client step, recomputed with torch.optim.SGD on a copy of its model: CE + alpha * KL_T(S_b || f(x_b))
    with S_b the payload rows of the batch's samples."""
    cfg = _config(tmp_path / "x.h5", **{"train.local_epochs": 2, "train.momentum": 0.5, "algorithm.alpha": 0.7})
    algo, data = _build(cfg)
    p, k, t = algo.params, 3, 1
    n = int(data.train_sizes[k])
    teacher = torch.randn(n, C, generator=torch.Generator().manual_seed(5)) * 3
    payload = torch.cat([torch.ones(1), teacher.reshape(-1)])
    states = {}
    reference = _model_of(algo, {k: algo.init_client_state(k)}, k)
    update = algo.client_update(_client(algo, data, states, k, t), payload)

    x, y = data.client(k).x_train, data.client(k).y_train
    opt = torch.optim.SGD(reference.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
    generator = client_generator(cfg.seed, k, t)
    kd_values = []
    for _ in range(cfg.train.local_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.train.batch_size):
            idx = order[start : start + cfg.train.batch_size]
            out = reference(x[idx])
            kd = _torch_kd(out, teacher[idx], p.temperature)
            opt.zero_grad()
            (F.cross_entropy(out, y[idx]) + p.alpha * kd).backward()
            opt.step()
            kd_values.append(float(kd.detach()))
    np.testing.assert_allclose(
        states[k]["model"].numpy(), algo.personal.layouts[1].flatten(reference).numpy(), rtol=1e-5, atol=1e-6
    )
    assert update.metrics["kd_loss"] == pytest.approx(np.mean(kd_values), rel=1e-5)


@pytest.mark.parametrize("case", ["alpha-0", "first-round"])
def test_without_server_logits_or_with_alpha_0_a_client_trains_on_plain_ce(tmp_path, case):
    """alpha = 0: nothing goes down and the client trains exactly as ``local``; alpha > 0 in a client's first
    round (flag 0, as the authors' first round): the same."""
    alpha = 0.0 if case == "alpha-0" else 1.0
    cfg = _config(tmp_path / "x.h5", **{"algorithm.alpha": alpha})
    algo, data = _build(cfg)
    k, t = 4, 0
    (payload,) = algo.downlink(t, [k], "train")
    assert payload.numel() == (0 if alpha == 0 else int(data.train_sizes[k]) * C + 1)
    states = {}
    update = algo.client_update(_client(algo, data, states, k, t), payload)
    plain = _client(algo, data, {}, k, t)
    algo.personal.layouts[0].load(algo.setup.model_for(k), plain.state["model"])
    loss = algo.local_training(plain)["train_loss"]
    expected = algo.personal.layouts[0].flatten(algo.setup.model)
    np.testing.assert_array_equal(states[k]["model"].numpy(), expected.numpy())
    assert update.metrics["train_loss"] == loss and update.metrics["kd_loss"] == 0.0


def test_logit_memory_last_round_keeps_only_the_last_rounds_clients(tmp_path):
    cfg = _config(tmp_path / "x.h5")
    for memory, sent in (("all", [1, 1]), ("last_round", [0, 1])):
        algo, data = _build(cfg, logit_memory=memory)
        states = {}
        _round(algo, data, states, [0, 1], t=0)
        _round(algo, data, states, [1, 2], t=1)
        down = algo.downlink(2, [0, 2], "train")
        assert [float(d[0]) for d in down] == sent, memory
        assert sorted(algo.logits) == ([0, 1, 2] if memory == "all" else [1, 2])


def test_unequal_feature_sizes_are_refused_before_the_run(tmp_path):
    cfg = tiny_config(tmp_path / "x.h5", "fedgkt", **{"model.architectures": "[{hidden: [16]}, {hidden: [24]}]"})
    with pytest.raises(ConfigError, match="model.architectures: fedgkt.*architecture 0: 16, architecture 1: 24"):
        check_buildable(cfg, load_federated(cfg.data, cfg.seed))


def test_the_recorded_server_test_accuracy_is_the_server_models_on_the_clients_test_features(tmp_path):
    """rounds/server_test_acc (the paper's accuracy) recomputed from the file's snapshots: the round's server model
    on base_k(x_test) of each of the round's clients, with k's model after that round; beside it, test_acc is the
    clients' own small models."""
    cfg = _config(tmp_path / "x.h5", rounds=2, clients_per_round=4, state_every=1)
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    algo, data = _build(cfg)
    with h5py.File(cfg.output_path) as f:
        recorded, loss = float(f["rounds/server_test_acc"][-1]), float(f["rounds/server_test_loss"][-1])
        own = float(f["rounds/test_acc"][-1])
        algo.server_layout.load(algo.server, torch.from_numpy(f["global/state/server_model"][-1]))
    states = read_client_states(cfg.output_path, "model")
    sampled = np.flatnonzero(read_clients(cfg.output_path, "participated")[-1])
    correct, losses, count = 0, 0.0, 0
    algo.server.eval()
    for k in sampled:
        model = _model_of(algo, {int(k): {"model": torch.from_numpy(states[k])}}, int(k)).eval()
        x, y = data.client(int(k)).x_test, data.client(int(k)).y_test
        with torch.no_grad():
            out = algo.server(model.base(x))
        correct += int((out.argmax(1) == y).sum())
        losses += float(F.cross_entropy(out, y, reduction="sum"))
        count += len(y)
    assert len(sampled) == 4 and count > 0
    assert recorded == pytest.approx(correct / count, abs=1e-6)
    assert loss == pytest.approx(losses / count, rel=1e-5)
    assert recorded != own  # two different models' scores, recorded apart


# -- state and resume ---------------------------------------------------------------------------------


def test_server_state_round_trips_exactly(tmp_path):
    cfg = _config(tmp_path / "x.h5")
    a, data = _build(cfg)
    states_a = {}
    _round(a, data, states_a, [0, 3, 8], t=0)
    saved = unflatten_state(flatten_state(a.server_state()))  # as in the file
    steps = [int(param["step"]) for param in saved["optimizer"].values()]  # torch Adam's state, one per tensor
    assert saved["logit_clients"].tolist() == [0, 3, 8]
    assert len(steps) == len(list(a.server.parameters())) and min(steps) > 0
    b, _ = _build(cfg)
    b.load_server_state(saved)
    states_b = {k: {n: v.clone() for n, v in s.items()} for k, s in states_a.items()}
    for key, value in flatten_state(a.server_state()).items():
        np.testing.assert_array_equal(flatten_state(b.server_state())[key], value, err_msg=key)
    down_a, rows_a, _ = _round(a, data, states_a, [3, 8, 9], t=1)
    down_b, rows_b, _ = _round(b, data, states_b, [3, 8, 9], t=1)
    for x, y in zip(down_a + rows_a, down_b + rows_b, strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    for key, value in flatten_state(a.server_state()).items():
        np.testing.assert_array_equal(flatten_state(b.server_state())[key], value, err_msg=key)


def test_resume_equals_an_unbroken_run(tmp_path):
    def config(name, rounds):
        return _config(tmp_path / f"{name}.h5", rounds=rounds, clients_per_round=4, state_every=1)

    straight = config("straight", 4)
    assert Engine(straight, SerialWorld(), show_progress=False).run() == 0
    assert Engine(config("resumed", 2), SerialWorld(), show_progress=False).run() == 0
    rest = config("resumed", 4)
    engine = Engine(rest, SerialWorld(), resume=True, show_progress=False)
    assert engine.start_round == 2 and engine.run() == 0
    with h5py.File(straight.output_path) as fa, h5py.File(rest.output_path) as fb:
        for name in ("test_acc", "train_loss", "server_loss", "server_kd_loss", "server_acc"):
            np.testing.assert_array_equal(fb["rounds"][name][...], fa["rounds"][name][...], err_msg=name)
        np.testing.assert_array_equal(fb["clients/kd_loss"][...], fa["clients/kd_loss"][...])
        np.testing.assert_array_equal(fb["global/state/server_model"][...], fa["global/state/server_model"][...])
        for g in range(2):
            key = f"clients/state/group{g}/model"
            np.testing.assert_array_equal(fb[key][...], fa[key][...], err_msg=key)
        for name in fa["checkpoint/slot1/server"]:
            key = f"checkpoint/slot1/server/{name}"
            np.testing.assert_array_equal(fb[key][...], fa[key][...], err_msg=key)
        assert np.nanmax(fb["clients/kd_loss"][2:]) > 0  # the resumed rounds did distil


# -- under the runtime --------------------------------------------------------------------------------


def test_a_serial_run_moves_per_sample_rows_up_and_logits_down(tmp_path):
    cfg = _config(tmp_path / "x.h5", rounds=3, clients_per_round=4, **{"data.partition": "quantity"})
    world = RecordingWorld()
    assert Engine(cfg, world, show_progress=False).run() == 0
    data = load_federated(cfg.data, cfg.seed)
    sampled = read_clients(cfg.output_path, "participated").astype(bool)
    n = [int(data.train_sizes[row].sum()) for row in sampled]
    n_test = [int(data.test_sizes[row].sum()) for row in sampled]
    moved = {label: [b for lab, b in world.moved if lab == label] for label in ("up", "down")}
    assert moved["up"] == [4 * (m * (D + C + 1) + m_test * (D + 1)) for m, m_test in zip(n, n_test, strict=True)]
    assert moved["down"] == [4 * (m * C + 4) for m in n]  # 4 clients: their logits and one flag each


def test_a_two_rank_run_records_the_per_sample_bytes_in_the_ledger(tmp_path):
    out = tmp_path / "mpi.h5"
    sets = {"rounds": 2, "clients_per_round": 3, "data.num_clients": 10, "data.partition": "quantity"}
    sets.update({"model.name": "mlp", "model.hidden": "[16]", "algorithm.name": "fedgkt", **SMALL})
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_", "MPI_", "HYDRA"))}
    cmd = [sys.executable, "-m", "pfl_mpi", "run", "-n", "2", "--quiet", "--out", str(out), *args]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stderr
    with h5py.File(out) as f:
        sizes, tests = f["partition/train_sizes"][...], f["partition/test_sizes"][...]
    sampled = read_clients(out, "participated").astype(bool)
    n, n_test = [int(sizes[row].sum()) for row in sampled], [int(tests[row].sum()) for row in sampled]
    expected = [4 * (m * (D + C + 1) + m_test * (D + 1)) for m, m_test in zip(n, n_test, strict=True)]
    assert committed(out, "rounds", "bytes_up").tolist() == expected
    assert committed(out, "rounds", "bytes_down").tolist() == [4 * (m * C + 3) for m in n]
    assert np.isfinite(committed(out, "rounds", "test_acc")).all()
