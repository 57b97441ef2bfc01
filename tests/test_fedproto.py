"""FedProto: prototypes up and down instead of weights, heterogeneous clients, nearest-prototype inference."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pfl_mpi.algorithms import Client, Setup, WeightedMean, resolve
from pfl_mpi.algorithms.fedproto import prototype_distance
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.data import load_federated
from pfl_mpi.models import ParamLayout, build_models
from pfl_mpi.runtime import Engine
from pfl_mpi.seeding import client_generator
from pfl_mpi.training.loop import local_training

from .helpers import tiny_config
from .test_e2e import TINY, pfl

TWO = "[{hidden: [16]}, {name: cnn2d, cnn2d_fc: [16]}]"  # embedding size 16 for both


def _config(out, **overrides):
    sets = {"model.architectures": TWO, "state_every": 1, "clients_per_round": "null", **overrides}
    return tiny_config(out, "fedproto", **sets)


def _algorithm(cfg, **params):
    """FedProto built as the runtime builds it, with the data."""
    data = load_federated(cfg.data, cfg.seed)
    models = build_models(cfg.model, data.input_shape, data.num_classes, cfg.seed)
    groups = cfg.model.groups(data.num_clients)
    setup = Setup(
        models[0], torch.device("cpu"), cfg.train, data.num_clients, data.num_classes, cfg.seed, models, groups
    )
    cls, p = resolve({**cfg.algorithm, **params})
    algo = cls(p, setup)
    algo.init_server()
    return algo, data


def _client(algo, data, k: int, t: int = 0) -> Client:
    state = algo.init_client_state(k)
    return Client(k, t, data.client(k), state, client_generator(algo.setup.seed, k, t))


def _model_from_state(cfg, data, group: int, vector: np.ndarray) -> torch.nn.Module:
    """A fresh model of architecture ``group`` holding the flat parameter vector ``vector`` (a client state)."""
    model = build_models(cfg.model, data.input_shape, data.num_classes, 0)[group]
    ParamLayout(model, [n for n, _ in model.named_parameters()]).load(model, torch.from_numpy(vector))
    return model


_CFG = tiny_config(Path("unused.h5"), "fedproto", **{"model.architectures": TWO})  # never run


def test_server_prototypes_are_the_count_weighted_mean_of_the_clients(tmp_path):
    """After one round with every client, the global prototype of class j is sum_k n_kj C_kj / sum_k n_kj, with
    the local prototypes C_kj recomputed here from the trained models in the file; each architecture's prototypes
    the same over its clients, and the recorded distances between them (group_proto_dist) and between the
    classes' global prototypes (class_proto_dist) are those of the recomputed prototypes. Each client's own head's
    accuracy is recorded beside the nearest prototype's (head_test_acc)."""
    cfg = _config(tmp_path / "fp.h5", rounds=1)
    engine = Engine(cfg, SerialWorld(), show_progress=False)
    assert engine.run() == 0
    algo, data = engine.algo, load_federated(cfg.data, cfg.seed)
    with h5py.File(cfg.output_path) as f:
        prototypes = f["global/state/prototypes"][0].reshape(data.num_classes, -1)
        counts = f["global/state/counts"][0]
        tables = [f[f"clients/state/group{g}/model"][0] for g in range(2)]
        rows = f["partition/group_row"][...]
        recorded = {name: float(f[f"rounds/{name}"][0]) for name in ("group_proto_dist", "class_proto_dist")}
        head_acc = f["clients/head_test_acc"][0]
        proto_acc = f["clients/test_acc"][0]
    weighted = np.zeros((2, data.num_classes, 16))  # per architecture group
    total = np.zeros((2, data.num_classes))
    for k in range(data.num_clients):
        g = algo.setup.group_of(k)
        model = _model_from_state(cfg, data, g, tables[g][rows[k]])
        with torch.no_grad():
            features = model.base(data.client(k).x_train).double().numpy()
            x_test, y_test = data.client(k).x_test, data.client(k).y_test
            assert head_acc[k] == pytest.approx(float((model(x_test).argmax(1) == y_test).float().mean()))
        y = data.client(k).y_train.numpy()
        for j in np.unique(y):
            local = features[y == j].mean(axis=0)  # the client's prototype of class j
            weighted[g, j] += (y == j).sum() * local
            total[g, j] += (y == j).sum()
    np.testing.assert_array_equal(counts, total.sum(0))
    assert (total.sum(0) > 0).all()
    global_ = weighted.sum(0) / total.sum(0)[:, None]
    np.testing.assert_allclose(prototypes, global_, rtol=1e-5, atol=1e-6)
    both = (total > 0).all(axis=0)  # the classes that clients of both architectures hold
    assert 3 <= both.sum() < 10
    groups = weighted[:, both] / total[:, both, None]
    assert recorded["group_proto_dist"] == pytest.approx(np.linalg.norm(groups[0] - groups[1], axis=1).mean(), rel=1e-5)
    pairs = [np.linalg.norm(global_[i] - global_[j]) for i in range(10) for j in range(i)]
    assert recorded["class_proto_dist"] == pytest.approx(np.mean(pairs), rel=1e-5)
    assert (head_acc != proto_acc).any()  # two inference rules, recorded apart


def test_a_class_nobody_reported_keeps_its_prototype():
    algo, _ = _algorithm(_CFG)
    c, d = algo.classes, algo.dim
    first = torch.zeros(c * d + c, dtype=torch.float64)
    first[: c * d] = torch.arange(c * d, dtype=torch.float64)
    first[c * d :] = 2.0  # every class, 2 samples each
    algo.aggregate(0, WeightedMean(torch.zeros(0), 1.0, 1, first))
    before = algo.prototypes.clone()
    second = torch.zeros_like(first)
    second[:d] = 3.0  # class 0 only: 3 samples summing to 3 per coordinate
    second[c * d] = 3.0
    algo.aggregate(1, WeightedMean(torch.zeros(0), 1.0, 1, second))
    assert torch.equal(algo.prototypes[0], torch.ones(d))
    assert torch.equal(algo.prototypes[1:], before[1:]) and torch.equal(before[1], torch.arange(d, 2 * d) / 2.0)
    assert algo.counts.tolist() == [3.0] + [2.0] * (c - 1)


def test_the_distance_term_is_the_reference_mse_with_missing_classes_at_zero():
    g = torch.Generator().manual_seed(0)
    features, prototypes = torch.randn(6, 4, generator=g), torch.randn(3, 4, generator=g)
    labels, present = torch.tensor([0, 1, 2, 2, 1, 0]), torch.tensor([True, False, True])
    target = torch.where(present[labels][:, None], prototypes[labels], features)  # the authors' proto_new
    torch.testing.assert_close(prototype_distance(features, labels, prototypes, present), F.mse_loss(features, target))


@pytest.mark.parametrize("lam,present", [(0.0, True), (5.0, False)])
def test_without_the_prototype_term_a_client_trains_as_local_sgd(lam, present):
    """lam = 0, or no global prototype yet: the client's model is plain SGD on CE (``loop.local_training``)."""
    cfg = tiny_config(Path("unused.h5"), "fedproto", **{"model.architectures": TWO, "train.momentum": 0.5})
    algo, data = _algorithm(cfg, lam=lam)
    c, d = algo.classes, algo.dim
    payload = torch.cat([torch.randn(c * d), torch.full((c,), 1.0 if present else 0.0)])
    for k in (0, 1):  # one client of each architecture
        client = _client(algo, data, k)
        update = algo.client_update(client, payload)
        model = build_models(cfg.model, data.input_shape, data.num_classes, cfg.seed)[algo.setup.group_of(k)]
        local_training(model, *client.train, cfg.train, client_generator(cfg.seed, k, 0))
        expected = ParamLayout(model, [n for n, _ in model.named_parameters()]).flatten(model)
        torch.testing.assert_close(client.state["model"], expected, rtol=0, atol=1e-6)
        assert update.weight == 1.0 and update.payload.dtype == torch.float64
        assert update.payload.numel() == algo.up_numel() == 2 * algo.up_numel_of(k) == 2 * (c * d + c)
        slots = update.payload.reshape(2, c * d + c)  # a slot per architecture: the client fills its own
        g = algo.setup.group_of(k)
        assert slots[g, c * d :].sum() == len(client.train[1]) and not slots[1 - g].any()


def test_the_prototype_term_pulls_embeddings_to_the_prototypes():
    algo_free, data = _algorithm(_CFG, lam=0.0)
    algo_pulled, _ = _algorithm(_CFG, lam=10.0)
    c, d = algo_free.classes, algo_free.dim
    prototypes = torch.zeros(c, d)  # every class at the origin
    payload = torch.cat([prototypes.reshape(-1), torch.ones(c)])
    distances = []
    for algo in (algo_free, algo_pulled):
        client = _client(algo, data, 2)
        algo.client_update(client, payload)
        model = algo.setup.model_for(2)
        with torch.no_grad():
            distances.append(float(model.base(client.train[0]).pow(2).mean()))
    assert distances[1] < 0.5 * distances[0]


def test_inference_is_the_nearest_prototype_among_the_clients_classes():
    algo, data = _algorithm(_CFG)
    c, d = algo.classes, algo.dim
    prototypes = torch.randn(c, d, generator=torch.Generator().manual_seed(3))
    present = torch.ones(c, dtype=torch.bool)
    present[5] = False
    payload = torch.cat([prototypes.reshape(-1), present.float()])
    for k in (0, 1, 4):
        client = _client(algo, data, k)
        algo.load_for_eval(client, payload)
        loss, acc, head_loss_again, head_acc = algo.evaluate_client(client)
        model = algo.setup.model_for(k)
        x, y = client.test
        with torch.no_grad():
            features = model.base(x).numpy()
            head_loss = float(F.cross_entropy(model(x), y))
        own = np.unique(client.train[1].numpy())
        candidates = [j for j in own if present[j]]
        dist = ((features[:, None, :] - prototypes.numpy()[None, candidates]) ** 2).sum(axis=2)
        predicted = np.asarray(candidates)[dist.argmin(axis=1)]
        assert acc == pytest.approx(float((predicted == y.numpy()).mean()))
        assert loss == head_loss_again == pytest.approx(head_loss, rel=1e-5)
        assert head_acc == pytest.approx(float((model(x).argmax(1) == y).float().mean()))


def test_unequal_embedding_sizes_are_refused_before_mpi_starts(tmp_path):
    run = pfl(
        "run",
        "-n",
        "2",
        "--out",
        str(tmp_path / "x.h5"),
        *TINY,
        "--set",
        "algorithm.name=fedproto",
        "--set",
        "model.architectures=[{hidden: [16]}, {name: cnn2d, cnn2d_fc: [8]}]",
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "pfl-mpi: config error: model.architectures: fedproto needs one embedding size (base output), "
        "got architecture 0: 16, architecture 1: 8"
    ]
    assert not (tmp_path / "x.h5").exists()


def test_two_architectures_through_the_command_line(tmp_path):
    """configs/fedproto.yaml, shortened, on 3 ranks: an MLP and a CNN in one job, one prototype per class."""
    out = tmp_path / "fp.h5"
    run = pfl(
        "run",
        "configs/fedproto.yaml",
        "-n",
        "3",
        "--out",
        str(out),
        "--quiet",
        *("--set", "rounds=3", "--set", "data.num_clients=10", "--set", "eval_every=3"),
        cwd=str(Path(__file__).parents[1]),
    )
    assert run.returncode == 0, run.stderr
    with h5py.File(out) as f:
        assert f.attrs["world_size"] == 3
        groups = f["partition/group"][...]
        np.testing.assert_array_equal(groups, np.arange(10) % 2)
        sizes = [f[f"clients/state/group{g}/model"].shape for g in (0, 1)]
        assert sizes[0][:2] == sizes[1][:2] == (1, 5) and sizes[0][2] != sizes[1][2]
        assert f["global/state/prototypes"].shape == (1, 10 * 64)
        assert f["rounds/test_acc"][-1] > 0.5
