"""LG-FedAvg: each client's representation (base) is its own state; only the global head is communicated."""

from __future__ import annotations

import h5py
import numpy as np
import torch

from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.data import load_federated
from pfl_mpi.runtime import Engine
from pfl_mpi.runtime.placement import sample_clients
from pfl_mpi.seeding import client_generator

from .helpers import flat, hand_sgd, initial_model, names_of, tiny_config

OVERRIDES = {"model.hidden": "[16, 12]", "model.head_layers": 2, "rounds": 2, "state_every": 1}


def test_down_and_up_are_the_head_only(tmp_path):
    cfg = tiny_config(tmp_path / "x.h5", "lgfedavg", **OVERRIDES)
    engine = Engine(cfg, SerialWorld(), show_progress=False)
    model, algo = engine.algo.setup.model, engine.algo
    head = sum(p.numel() for p in model.head.parameters())
    base = sum(p.numel() for p in model.base.parameters())
    assert head == (16 * 12 + 12) + (12 * 10 + 10)  # fc2 and fc3: head_layers = 2
    assert algo.down_numel() == algo.up_numel() == head
    assert algo.client_state_spec(0) == {"personal": base}
    assert algo.shared.names == ("head.fc2.weight", "head.fc2.bias", "head.fc3.weight", "head.fc3.bias")


def test_bases_are_personal_state_and_the_head_is_averaged(tmp_path):
    cfg = tiny_config(tmp_path / "lg.h5", "lgfedavg", **OVERRIDES)
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    data = load_federated(cfg.data, cfg.seed)
    model = initial_model(cfg, data)
    base, head = names_of(model, "base."), names_of(model, "head.")
    lr, bs = cfg.train.lr, cfg.train.batch_size

    # LG-FedAvg by hand: every client keeps a base; each round the sampled ones train base and head jointly
    # from their base and the global head; the heads are averaged by training samples
    bases = {k: flat(model, base) for k in range(data.num_clients)}
    global_head = flat(model, head)
    for t in range(cfg.rounds):
        heads, weights = [], []
        for k in (int(k) for k in sample_clients(cfg.seed, t, data.num_clients, cfg.sampled_per_round)):
            local = initial_model(cfg, data)
            torch.nn.utils.vector_to_parameters(torch.cat([bases[k], global_head]), local.parameters())
            c = data.client(k)
            hand_sgd(local, base + head, c.x_train, c.y_train, lr, bs, client_generator(cfg.seed, k, t), 1)
            bases[k] = flat(local, base)
            heads.append(flat(local, head))
            weights.append(float(len(c.y_train)))
        w = torch.tensor(weights)
        global_head = (w[:, None] * torch.stack(heads)).sum(0) / w.sum()

    with h5py.File(cfg.output_path) as f:
        stored_head = torch.from_numpy(f["global/state/shared"][-1])
        stored_bases = torch.from_numpy(f["clients/state/personal"][-1])
        acc = f["clients/test_acc"][-1]
    torch.testing.assert_close(stored_head, global_head, rtol=1e-4, atol=1e-5)
    for k in range(data.num_clients):
        torch.testing.assert_close(stored_bases[k], bases[k], rtol=1e-4, atol=1e-5)
    trained = [k for k in range(data.num_clients) if not torch.equal(bases[k], flat(model, base))]
    assert len(trained) >= 8
    rows = stored_bases[trained].numpy()
    assert all(np.abs(rows[i] - rows[j]).max() > 1e-3 for i in range(len(rows)) for j in range(i))

    # evaluation: each client's own base under the global head
    for k in (0, 4, 9):
        local = initial_model(cfg, data)
        torch.nn.utils.vector_to_parameters(torch.cat([bases[k], global_head]), local.parameters())
        c = data.client(k)
        with torch.no_grad():
            expected = float((local(c.x_test).argmax(1) == c.y_test).float().mean())
        assert abs(acc[k] - expected) < 1e-6
