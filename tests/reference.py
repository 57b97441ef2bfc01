"""FedAvg written plainly, without the runtime: the reference the runtime's results must equal.

It shares with the runtime only the definitions of the data, the model and the random streams
(which clients a round samples, each client's generator); the training loop and the averaging
are written here again, sequentially, in one process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pfl_mpi.data import load_federated
from pfl_mpi.models import build_model
from pfl_mpi.runtime.placement import sample_clients
from pfl_mpi.seeding import client_generator


def fedavg_reference(cfg, rounds: int) -> torch.Tensor:
    """The global parameters after ``rounds`` rounds of FedAvg (weights by sample count), flattened."""
    data = load_federated(cfg.data, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    params = list(model.parameters())
    w = [p.detach().clone() for p in params]
    tc = cfg.train
    for t in range(rounds):
        total, acc = 0.0, [torch.zeros_like(p) for p in w]
        for k in sample_clients(cfg.seed, t, data.num_clients, cfg.sampled_per_round):
            client = data.client(int(k))
            with torch.no_grad():
                for p, v in zip(params, w, strict=True):
                    p.copy_(v)
            generator = client_generator(cfg.seed, int(k), t)
            for _ in range(tc.local_epochs):
                order = torch.randperm(len(client.y_train), generator=generator)
                for start in range(0, len(order), tc.batch_size):
                    idx = order[start : start + tc.batch_size]
                    loss = F.cross_entropy(model(client.x_train[idx]), client.y_train[idx])
                    grads = torch.autograd.grad(loss, params)
                    with torch.no_grad():
                        for p, g in zip(params, grads, strict=True):
                            p -= tc.lr * g
            n = float(len(client.y_train))
            total += n
            for a, p in zip(acc, params, strict=True):
                a += n * p.detach()
        w = [a / total for a in acc]
    return torch.cat([v.reshape(-1) for v in w])
