"""FedRep: the head is fitted first with the body frozen, then the body with the head frozen; only the body moves."""

from __future__ import annotations

import h5py
import numpy as np
import torch

from pfl_mpi.algorithms import Client, Setup, resolve
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.data import load_federated
from pfl_mpi.runtime import Engine
from pfl_mpi.runtime.placement import sample_clients
from pfl_mpi.seeding import client_generator

from .helpers import flat, hand_sgd, initial_model, names_of, tiny_config


def make_fedrep(cfg, **algorithm):
    """A FedRep instance on the tiny data, outside the runtime, with its data and initial model."""
    data = load_federated(cfg.data, cfg.seed)
    model = initial_model(cfg, data)
    cls, params = resolve({"name": "fedrep", **algorithm})
    setup = Setup(model, torch.device("cpu"), cfg.train, data.num_clients, data.num_classes, cfg.seed)
    setup.label_distribution = torch.full((data.num_classes,), 1.0 / data.num_classes)
    algo = cls(params, setup)
    algo.init_server()
    return algo, data


def run_client(algo, data, k, t=0):
    state = {name: v.clone() for name, v in algo.init_client_state(k).items()}
    client = Client(k, t, data.client(k), state, client_generator(algo.setup.seed, k, t))
    update = algo.client_update(client, algo.downlink(t, [k], "train").clone())
    return update, state


def test_sizes_and_state_are_the_body_and_the_head(tmp_path):
    cfg = tiny_config(tmp_path / "x.h5", "fedrep")
    algo, _ = make_fedrep(cfg)
    model = algo.setup.model
    body = sum(p.numel() for p in model.base.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert algo.down_numel() == algo.up_numel() == body == 64 * 16 + 16
    assert algo.client_state_spec(0) == {"personal": head}
    assert head == 16 * 10 + 10


def test_tau_b_zero_changes_only_the_head_and_tau_h_zero_only_the_body(tmp_path):
    cfg = tiny_config(tmp_path / "x.h5", "fedrep")
    algo, data = make_fedrep(cfg, tau_h=2, tau_b=0)
    initial_head = algo.init_client_state(3)["personal"]
    update, state = run_client(algo, data, 3)
    assert torch.equal(update.payload, torch.zeros_like(update.payload))  # body unchanged: nothing to send
    assert not torch.equal(state["personal"], initial_head)  # head trained

    algo, data = make_fedrep(cfg, tau_h=0, tau_b=2)
    update, state = run_client(algo, data, 3)
    assert update.payload.abs().max() > 1e-4  # body trained
    assert torch.equal(state["personal"], initial_head)  # head untouched


def test_client_update_is_head_epochs_then_body_epochs(tmp_path):
    cfg = tiny_config(tmp_path / "x.h5", "fedrep")
    algo, data = make_fedrep(cfg, tau_h=3, tau_b=2)
    k, lr, bs = 5, cfg.train.lr, cfg.train.batch_size
    update, state = run_client(algo, data, k)

    model = initial_model(cfg, data)
    body, head = names_of(model, "base."), names_of(model, "head.")
    start = flat(model, body)
    x, y = data.client(k).x_train, data.client(k).y_train
    generator = client_generator(cfg.seed, k, 0)
    hand_sgd(model, head, x, y, lr, bs, generator, epochs=3)
    hand_sgd(model, body, x, y, lr, bs, generator, epochs=2)
    torch.testing.assert_close(state["personal"], flat(model, head), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(update.payload, flat(model, body) - start, rtol=1e-5, atol=1e-6)

    # the other order (body first) is a different update: the order is part of the algorithm
    other = initial_model(cfg, data)
    generator = client_generator(cfg.seed, k, 0)
    hand_sgd(other, body, x, y, lr, bs, generator, epochs=2)
    hand_sgd(other, head, x, y, lr, bs, generator, epochs=3)
    assert (flat(other, body) - start - update.payload).abs().max() > 1e-3


def test_only_the_body_moves_and_heads_stay_personal(tmp_path):
    cfg = tiny_config(tmp_path / "fedrep.h5", "fedrep", rounds=1, **{"algorithm.tau_h": 2, "algorithm.tau_b": 1})
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    data = load_federated(cfg.data, cfg.seed)
    model = initial_model(cfg, data)
    body, head = names_of(model, "base."), names_of(model, "head.")
    start_body, start_head = flat(model, body), flat(model, head)

    sampled = [int(k) for k in sample_clients(cfg.seed, 0, data.num_clients, cfg.sampled_per_round)]
    bodies, heads = [], {}
    for k in sampled:  # FedRep by hand: head epochs, then body epochs, from the global body and the initial head
        local = initial_model(cfg, data)
        c = data.client(k)
        generator = client_generator(cfg.seed, k, 0)
        hand_sgd(local, head, c.x_train, c.y_train, cfg.train.lr, cfg.train.batch_size, generator, 2)
        hand_sgd(local, body, c.x_train, c.y_train, cfg.train.lr, cfg.train.batch_size, generator, 1)
        bodies.append(flat(local, body))
        heads[k] = flat(local, head)

    with h5py.File(cfg.output_path) as f:
        global_body = torch.from_numpy(f["global/state/shared"][-1])
        personal = torch.from_numpy(f["clients/state/personal"][-1])
    assert global_body.numel() == start_body.numel() and personal.shape == (10, start_head.numel())
    torch.testing.assert_close(global_body, torch.stack(bodies).mean(0), rtol=1e-4, atol=1e-5)  # uniform mean
    for k in range(10):
        expected = heads.get(k, start_head)  # clients not sampled keep the initial head
        torch.testing.assert_close(personal[k], expected, rtol=1e-4, atol=1e-5)
    rows = np.stack([personal[k].numpy() for k in sampled])
    assert all(np.abs(rows[i] - rows[j]).max() > 1e-3 for i in range(len(rows)) for j in range(i))
