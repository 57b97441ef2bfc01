"""Local fine-tuning after the last round equals fine-tuning the final model by hand."""

from __future__ import annotations

import h5py
import torch
import torch.nn.functional as F

from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.data import load_federated
from pfl_mpi.models import build_model
from pfl_mpi.runtime import Engine
from pfl_mpi.seeding import client_generator

from .helpers import tiny_config


def test_finetuned_accuracy_equals_an_independent_finetune(tmp_path):
    cfg = tiny_config(tmp_path / "ft.h5", "fedavg", rounds=2, finetune_epochs=3)
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    with h5py.File(cfg.output_path) as f:
        final = torch.from_numpy(f["global/state/shared"][-1])
        before, after = f["clients/test_acc"][-1], f["clients/finetune_test_acc"][-1]
        round_after = f["rounds/finetune_test_acc"][-1]
    data = load_federated(cfg.data, cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    params = list(model.parameters())
    for k in (0, 7):
        torch.nn.utils.vector_to_parameters(final, params)
        client = data.client(k)
        generator = client_generator(cfg.seed, k, cfg.rounds)
        for _ in range(3):
            order = torch.randperm(len(client.y_train), generator=generator)
            for start in range(0, len(order), cfg.train.batch_size):
                idx = order[start : start + cfg.train.batch_size]
                loss = F.cross_entropy(model(client.x_train[idx]), client.y_train[idx])
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for p, g in zip(params, grads, strict=True):
                        p -= cfg.train.lr * g
        with torch.no_grad():
            acc = float((model(client.x_test).argmax(1) == client.y_test).float().mean())
        assert abs(acc - after[k]) < 1e-6
    assert (after != before).any()
    n_test = data.test_sizes
    assert abs(round_after - float((n_test * after).sum() / n_test.sum())) < 1e-6  # clients are stored as float32
