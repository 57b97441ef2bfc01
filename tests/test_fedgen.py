"""FedGen: the label-count weights, the generator's server step, what moves, the clients' regulariser, resume.

Expected values are computed here independently: weights by loops over counts, the generator step with
torch.optim.Adam on a copy of the generator, the client step with torch.optim.SGD and hand-built networks.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pfl_mpi.algorithms import Broadcast, Client, Collected, Gathered, Setup, resolve
from pfl_mpi.algorithms import fedgen as fedgen_module
from pfl_mpi.algorithms.fedgen import FedGen, label_weights
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.data import load_federated
from pfl_mpi.errors import ConfigError
from pfl_mpi.runtime import Engine
from pfl_mpi.seeding import client_generator, derive_seed
from pfl_mpi.store.nested import flatten_state, unflatten_state

from .helpers import RecordingWorld, committed, initial_model, tiny_config


def _build(cfg, name="fedgen", **params):
    """(algorithm, data) built as every rank builds them, the server initialised."""
    data = load_federated(cfg.data, cfg.seed)
    model = initial_model(cfg, data)
    cls, p = resolve({"name": name, **params})
    setup = Setup(model, torch.device("cpu"), cfg.train, data.num_clients, data.num_classes, cfg.seed)
    counts = sum(torch.bincount(data.client(k).y_train, minlength=data.num_classes) for k in range(data.num_clients))
    setup.label_distribution = (counts / counts.sum()).float()  # as the runtime sets it
    algo = cls(p, setup)
    algo.init_server()
    return algo, data


def _client(algo, data, k: int, t: int) -> Client:
    return Client(k, t, data.client(k), algo.init_client_state(k), client_generator(algo.setup.seed, k, t))


def _round(algo, data, clients, t):
    """Train ``clients`` on round t's downlink and aggregate them; return (downlink, Collected)."""
    down = algo.downlink(t, clients, "train").clone()
    updates = [algo.client_update(_client(algo, data, k, t), down.clone()) for k in clients]
    up = Collected(list(clients), torch.stack([u.payload for u in updates]), torch.tensor([u.weight for u in updates]))
    algo.aggregate(t, up)
    return down, up


# -- weights ------------------------------------------------------------------------------------------


def test_label_weights_are_each_clients_share_of_every_label():
    counts = torch.tensor([[3, 0, 5, 0], [1, 0, 0, 2], [0, 0, 5, 6]], dtype=torch.float32)
    alpha = label_weights(counts).numpy()
    for y in range(4):
        total = sum(float(counts[k, y]) for k in range(3))
        for k in range(3):
            assert alpha[k, y] == pytest.approx(float(counts[k, y]) / total if total else 0.0, abs=1e-12)
    np.testing.assert_allclose(alpha.sum(axis=0), [1, 0, 1, 1])  # label 1: held by no client, no weight


def test_the_generator_step_uses_label_count_weights_on_every_clients_head(tmp_path):
    """One server step, recomputed: labels and noise from the round's stream, the teacher loss weighted per
    sample by alpha_k^y from loops over the counts, the diversity loss over pairs, one torch Adam step."""
    cfg = tiny_config(tmp_path / "x.h5", "fedgen")
    algo, data = _build(cfg, ensemble_epochs=1, n_teacher_iters=1, generator_batch_size=6)
    p, t = algo.params, 3
    clients = [0, 4, 7]
    before = copy.deepcopy(algo.generator)
    down = algo.downlink(t, clients, "train")
    rows = [algo.client_update(_client(algo, data, k, t), down.clone()).payload for k in clients]
    # the gathered rows in rank order (not sorted): the server's result must not depend on it
    up = Collected([7, 0, 4], torch.stack([rows[2], rows[0], rows[1]]), torch.ones(3))
    algo.aggregate(t, up)

    d, num_classes = algo.shared.numel, data.num_classes
    counts = [row[d:] for row in rows]
    heads = []
    for row in rows:
        model = initial_model(cfg, data)
        torch.nn.utils.vector_to_parameters(row[:d], model.parameters())
        heads.append(model.head)
    rng = torch.Generator().manual_seed(derive_seed(cfg.seed, fedgen_module._SERVER_STEPS, t))
    totals = sum(c.double() for c in counts)
    y = torch.multinomial((totals / totals.sum()).float(), 6, replacement=True, generator=rng)
    z = torch.rand(6, p.noise_dim, generator=rng)
    generator = copy.deepcopy(before).train()
    optimizer = torch.optim.Adam(
        generator.parameters(), lr=p.ensemble_lr * p.ensemble_lr_decay**t, weight_decay=p.weight_decay
    )
    features = generator(z, y)
    teacher = 0
    for k, head in enumerate(heads):
        ce = F.cross_entropy(head(features), y, reduction="none")
        alpha = torch.tensor([float(counts[k][int(c)]) / float(totals[int(c)]) for c in y])
        teacher = teacher + (alpha * ce).mean()
    pairs = [
        float(((z[b] - z[c]) ** 2).mean()) * (features[b] - features[c]).abs().mean()
        for b in range(6)
        for c in range(6)
    ]
    diversity = torch.exp(-sum(pairs) / 36)
    (p.ensemble_alpha * teacher + p.ensemble_eta * diversity).backward()
    optimizer.step()

    assert num_classes == 10 and not torch.equal(algo.generator.flat(), before.flat())
    np.testing.assert_allclose(algo.generator.flat().numpy(), generator.flat().numpy(), rtol=1e-5, atol=1e-6)


# -- what moves ---------------------------------------------------------------------------------------


def test_the_fitted_generator_goes_down_with_w_and_the_model_is_averaged(tmp_path):
    cfg = tiny_config(tmp_path / "x.h5", "fedgen")
    algo, data = _build(cfg, ensemble_epochs=5)
    d, g = algo.shared.numel, algo.generator.numel
    assert isinstance(algo.down, Broadcast) and isinstance(algo.up, Gathered)
    assert algo.down_numel() == d + g and algo.up_numel() == d + data.num_classes
    hidden, feature_dim = algo.params.hidden_dim, algo.setup.model.feature_dim
    assert (
        g
        == (algo.params.noise_dim + 10) * hidden + hidden + 2 * hidden + hidden * feature_dim + feature_dim + 2 * hidden
    )

    initial = algo.generator.flat()
    down, up = _round(algo, data, [1, 2, 5], t=0)
    np.testing.assert_array_equal(down[d:].numpy(), initial.numpy())
    after = algo.downlink(1, [0], "train")
    assert not torch.equal(after[d:], initial)  # fitted during aggregate
    np.testing.assert_array_equal(after[d:].numpy(), algo.generator.flat().numpy())  # ... and that is what goes down
    bn = algo.generator.bn  # the running statistics travel too
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    # w: the sample-weighted mean of the trained models (FedAvg)
    weights = up.weights.double() / up.weights.double().sum()
    expected = (up.payloads[:, :d].double() * weights[:, None]).sum(dim=0)
    np.testing.assert_allclose(after[:d].numpy(), expected.numpy(), atol=1e-6)
    # the counts that came up are the clients' training label counts
    for k, row in zip(up.clients, up.payloads, strict=True):
        expected_counts = torch.bincount(data.client(k).y_train, minlength=10).float()
        np.testing.assert_array_equal(row[d:].numpy(), expected_counts.numpy())


def _reference_client(cfg, data, algo, payload: torch.Tensor, k: int, t: int) -> torch.Tensor:
    """FedGen's local objective with torch.optim.SGD, the generator rebuilt by hand from the payload."""
    p, train = algo.params, cfg.train
    d, nc = algo.shared.numel, data.num_classes
    model = initial_model(cfg, data)
    torch.nn.utils.vector_to_parameters(payload[:d], model.parameters())
    hidden, fdim = p.hidden_dim, model.feature_dim
    fc, bn, out = nn.Linear(p.noise_dim + nc, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, fdim)
    tensors = [fc.weight, fc.bias, bn.weight, bn.bias, out.weight, out.bias, bn.running_mean, bn.running_var]
    chunks = payload[d:].split([x.numel() for x in tensors])
    with torch.no_grad():
        for x, c in zip(tensors, chunks, strict=True):
            x.copy_(c.view_as(x))
    generator = nn.Sequential(fc, bn, nn.ReLU(), out).eval()

    def generate(z, labels):
        return generator(torch.cat([z, F.one_hot(labels, nc).float()], dim=1))

    alpha = max(1e-4, p.generative_alpha * p.generative_decay**t) if p.generative_alpha else 0.0
    beta = max(1e-4, p.generative_beta * p.generative_decay**t) if p.generative_beta else 0.0
    batches = client_generator(cfg.seed, k, t)
    noise = torch.Generator().manual_seed(derive_seed(batches.initial_seed(), fedgen_module._CLIENT_NOISE))
    x, y = data.client(k).x_train, data.client(k).y_train
    optimizer = torch.optim.SGD(model.parameters(), lr=train.lr)
    for _ in range(train.local_epochs):
        order = torch.randperm(len(y), generator=batches)
        for start in range(0, len(y), train.batch_size):
            idx = order[start : start + train.batch_size]
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            if beta:
                z = torch.rand(len(idx), p.noise_dim, generator=noise)
                target = F.softmax(model.head(generate(z, y[idx])), dim=1).detach()
                log_p = F.log_softmax(logits, dim=1)
                loss = loss + beta * (target * (target.log() - log_p)).sum() / len(idx)
            if alpha:
                sampled = torch.multinomial(algo.setup.label_distribution, p.gen_batch_size, True, generator=noise)
                z = torch.rand(p.gen_batch_size, p.noise_dim, generator=noise)
                synthetic = F.cross_entropy(model.head(generate(z, sampled).detach()), sampled)
                loss = loss + p.gen_batch_size / train.batch_size * alpha * synthetic
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


@pytest.mark.parametrize("alpha,beta", [(2.0, 0.0), (0.0, 3.0), (2.0, 3.0)])
def test_a_client_regularises_with_exactly_the_generator_it_received(tmp_path, alpha, beta):
    cfg = tiny_config(tmp_path / "x.h5", "fedgen", **{"train.local_epochs": 2})
    algo, data = _build(cfg, generative_alpha=alpha, generative_beta=beta, ensemble_epochs=10)
    _round(algo, data, [0, 3, 6], t=0)
    t, k = 2, 3
    payload = algo.downlink(t, [k], "train").clone()
    update = algo.client_update(_client(algo, data, k, t), payload.clone())
    expected = _reference_client(cfg, data, algo, payload, k, t)
    np.testing.assert_allclose(update.payload[: algo.shared.numel].numpy(), expected.numpy(), atol=2e-6)
    assert update.metrics["synthetic_loss"] > 0 if alpha else update.metrics["synthetic_loss"] == 0
    assert update.metrics["latent_loss"] > 0 if beta else update.metrics["latent_loss"] == 0

    # another generator in the payload: another result
    other = payload.clone()
    other[algo.shared.numel :] = algo._new_generator().flat()
    changed = algo.client_update(_client(algo, data, k, t), other)
    assert (changed.payload - update.payload).abs().max() > 1e-4


def test_without_regulariser_weights_a_client_trains_exactly_as_in_fedavg(tmp_path):
    cfg = tiny_config(tmp_path / "x.h5", "fedgen", **{"train.local_epochs": 2, "train.momentum": 0.5})
    gen, data = _build(cfg, generative_alpha=0.0, generative_beta=0.0, ensemble_epochs=5)
    avg, _ = _build(cfg, name="fedavg")
    _round(gen, data, [0, 3, 6], t=0)
    t, k, d = 1, 3, gen.shared.numel
    payload = gen.downlink(t, [k], "train").clone()
    mine = gen.client_update(_client(gen, data, k, t), payload.clone())
    fedavg = avg.client_update(_client(avg, data, k, t), payload[:d].clone())
    assert torch.equal(mine.payload[:d] - payload[:d], fedavg.payload)  # FedAvg sends w_k - w, FedGen w_k
    assert mine.weight == fedavg.weight
    assert mine.metrics["train_loss"] == pytest.approx(fedavg.metrics["train_loss"], rel=1e-6)

    # the same client with the regulariser on ends elsewhere
    on, _ = _build(cfg, generative_alpha=1.0, generative_beta=0.0, ensemble_epochs=5)
    _round(on, data, [0, 3, 6], t=0)
    regularised = on.client_update(_client(on, data, k, t), on.downlink(t, [k], "train").clone())
    assert (regularised.payload[:d] - mine.payload[:d]).abs().max() > 1e-4


def test_the_first_round_has_no_regulariser(tmp_path):
    cfg = tiny_config(tmp_path / "x.h5", "fedgen")
    algo, data = _build(cfg)
    update = algo.client_update(_client(algo, data, 2, 0), algo.downlink(0, [2], "train").clone())
    assert update.metrics["synthetic_loss"] == update.metrics["latent_loss"] == 0


# -- configuration, server state, whole runs ------------------------------------------------------------


def test_parameters_are_named_as_in_the_authors_code():
    cls, p = resolve({"name": "fedgen"})
    assert cls is FedGen
    defaults = (p.generative_alpha, p.generative_beta, p.gen_batch_size, p.ensemble_lr, p.ensemble_eta)
    assert defaults == (10.0, 10.0, 32, 3e-4, 1.0)
    assert (p.hidden_dim, p.noise_dim, p.generator_steps) == (256, 32, 50)
    with pytest.raises(ConfigError, match="algorithm.generative_alpha"):
        resolve({"name": "fedgen", "generative_alpha": -1})
    with pytest.raises(ConfigError, match="n_teacher_iters"):
        resolve({"name": "fedgen", "ensemble_epochs": 3, "n_teacher_iters": 5})


def test_server_state_round_trips_exactly(tmp_path):
    cfg = tiny_config(tmp_path / "x.h5", "fedgen")
    a, data = _build(cfg, ensemble_epochs=5, server_opt={"name": "adam"})
    _round(a, data, [1, 4], t=0)
    saved = flatten_state(a.server_state())  # as in the file
    assert float(saved["generator_adam.0.step"]) == 5
    b, _ = _build(cfg, ensemble_epochs=5, server_opt={"name": "adam"})
    b.load_server_state(unflatten_state(saved))
    for key, value in flatten_state(a.server_state()).items():
        np.testing.assert_array_equal(flatten_state(b.server_state())[key], value, err_msg=key)
    _, up_a = _round(a, data, [2, 3], t=1)
    _, up_b = _round(b, data, [2, 3], t=1)
    np.testing.assert_array_equal(up_b.payloads.numpy(), up_a.payloads.numpy())
    for key, value in flatten_state(a.server_state()).items():
        np.testing.assert_array_equal(flatten_state(b.server_state())[key], value, err_msg=key)


def test_resume_equals_an_unbroken_run(tmp_path):
    sets = {"algorithm.ensemble_epochs": 10, "algorithm.generative_alpha": 1, "algorithm.generative_beta": 1}
    straight = tiny_config(tmp_path / "straight.h5", "fedgen", rounds=4, **sets)
    assert Engine(straight, SerialWorld(), show_progress=False).run() == 0
    first = tiny_config(tmp_path / "resumed.h5", "fedgen", rounds=2, **sets)
    assert Engine(first, SerialWorld(), show_progress=False).run() == 0
    rest = tiny_config(tmp_path / "resumed.h5", "fedgen", rounds=4, **sets)
    engine = Engine(rest, SerialWorld(), resume=True, show_progress=False)
    assert engine.start_round == 2 and engine.run() == 0
    with h5py.File(straight.output_path) as fa, h5py.File(rest.output_path) as fb:
        for name in ("test_acc", "train_loss", "generator_teacher_loss", "ensemble_acc"):
            np.testing.assert_array_equal(fb["rounds"][name][...], fa["rounds"][name][...], err_msg=name)
        np.testing.assert_array_equal(fb["clients/latent_loss"][...], fa["clients/latent_loss"][...])
        for name in ("shared", "generator"):
            np.testing.assert_array_equal(fb["global/state"][name][-1], fa["global/state"][name][-1], err_msg=name)
        assert np.nanmax(fb["clients/synthetic_loss"][-1]) > 0  # the resumed rounds did use the generator


def test_each_client_sends_its_model_and_label_counts_and_the_generator_goes_down(tmp_path):
    cfg = tiny_config(tmp_path / "x.h5", "fedgen", rounds=2, clients_per_round=4, **{"algorithm.ensemble_epochs": 5})
    world = RecordingWorld()
    engine = Engine(cfg, world, show_progress=False)
    assert engine.run() == 0
    algo = engine.algo
    d = sum(q.numel() for q in algo.setup.model.parameters())
    g = sum(t.numel() for t in algo.generator.state_tensors())
    by_label: dict[str, list[int]] = {}
    for label, nbytes in world.moved:
        by_label.setdefault(label, []).append(nbytes)
    assert by_label["up"] == [(d + 10) * 4 * 4] * 2  # 4 clients: parameters and 10 label counts, float32
    assert by_label["down"] == [(d + g) * 4] * 2  # one Bcast of w and the generator


def test_a_two_rank_run_records_model_and_counts_up_and_model_and_generator_down(tmp_path):
    out = tmp_path / "mpi.h5"
    sets = {"rounds": 2, "clients_per_round": 3, "data.num_clients": 10, "model.hidden": "[16]"}
    sets.update({"algorithm.ensemble_epochs": 5, "algorithm.hidden_dim": 32, "algorithm.noise_dim": 8})
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_", "MPI_", "HYDRA"))}
    cmd = [sys.executable, "-m", "pfl_mpi", "run", "-n", "2", "--quiet", "--out", str(out)]
    cmd += ["--set", "algorithm.name=fedgen", "--set", "data.partition=shards", *args]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    d = 64 * 16 + 16 + 16 * 10 + 10  # digits 8 x 8 -> mlp [16] -> 10 classes
    g = (8 + 10) * 32 + 32 + 2 * 32 + 32 * 16 + 16 + 2 * 32  # generator: hidden 32, noise 8, features 16
    assert committed(out, "rounds", "bytes_up").tolist() == [4 * (d + 10) * 3] * 2
    assert committed(out, "rounds", "bytes_down").tolist() == [4 * (d + g)] * 2
    assert math.isfinite(committed(out, "rounds", "test_acc")[-1])
