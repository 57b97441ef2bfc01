"""Per-FedAvg HF: cost and accuracy of the three Hessian-vector products (``algorithm.hvp``).

The case of issue 17: MNIST-1D, 50 clients with 2 classes each (shards), the cnn1d network, minibatches of 16.
On one client, at the initial weights w and with u = grad f(w~; D') as in a local step:

- cost: one Per-FedAvg HF local step (two gradients, then the product) with each ``hvp``, the three timed in
  turn, ``--repeats`` times each, one torch thread; the median seconds and the ratio to ``scaled`` are printed.
  Timings on a shared machine are noisy: compare the ratios of one invocation.
- accuracy: the relative error ||d - Hu|| / ||Hu|| of the finite-difference estimates against the exact product,
  for the paper's estimator (probes delta ||u|| from w) and the scaled one (probes delta from w), as ||u|| grows
  (u rescaled) and for several delta.

    .venv/bin/python benchmarks/perfedavg_hvp.py
    .venv/bin/python benchmarks/perfedavg_hvp.py --repeats 200 --model cnn1d --batch 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from pfl_mpi.algorithms import Setup
from pfl_mpi.algorithms.meta import BatchStream, FunctionalModel, hvp_exact, hvp_finite_difference, leaves
from pfl_mpi.algorithms.perfedavg import PerFedAvg, PerFedAvgParams
from pfl_mpi.config import load_config
from pfl_mpi.data import load_federated
from pfl_mpi.models import build_model
from pfl_mpi.training.loop import TrainConfig


def norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=100, help="local steps timed per estimator")
    p.add_argument("--model", default="cnn1d", help="model.name")
    p.add_argument("--batch", type=int, default=16, help="minibatch size (train.batch_size)")
    p.add_argument("--client", type=int, default=0, help="the client whose data is used")
    args = p.parse_args()
    torch.set_num_threads(1)
    sets = ["data.name=mnist1d", "data.num_clients=50", "data.partition=shards", "data.classes_per_client=2"]
    cfg = load_config(None, [*sets, f"model.name={args.model}", "algorithm.name=perfedavg"])
    data = load_federated(cfg.data, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    client = data.client(args.client)
    setup = Setup(model, torch.device("cpu"), TrainConfig(batch_size=args.batch), data.num_clients, 10, cfg.seed)

    # -- cost of one local step --------------------------------------------------------------------------
    steppers = {h: PerFedAvg(PerFedAvgParams(hvp=h, alpha=0.05, beta=0.1), setup) for h in ("exact", "scaled", "paper")}
    w0 = [t.detach().clone() for t in model.parameters()]
    seconds: dict[str, list[float]] = {h: [] for h in steppers}
    for i in range(args.repeats + 1):
        for h, algo in steppers.items():
            batches = BatchStream(client.x_train, client.y_train, args.batch, torch.Generator().manual_seed(i))
            start = time.perf_counter()
            algo.local_step(leaves(w0), batches)
            if i:  # the first round warms up
                seconds[h].append(time.perf_counter() - start)
    load = os.getloadavg()[0]
    print(f"MNIST-1D, {args.model}, batch {args.batch}, one HF local step, {args.repeats} repeats, load {load:.1f}")
    print("| hvp | median ms per local step | ratio to scaled |")
    print("|---|---|---|")
    ref = statistics.median(seconds["scaled"])
    for h, times in seconds.items():
        print(f"| {h} | {1e3 * statistics.median(times):.2f} | {statistics.median(times) / ref:.2f} |")

    # -- accuracy ----------------------------------------------------------------------------------------
    fn = FunctionalModel(model)
    batches = BatchStream(client.x_train, client.y_train, args.batch, torch.Generator().manual_seed(0))
    (x1, y1), (x2, y2), (x3, y3) = batches.next(), batches.next(), batches.next()
    w = leaves(w0)
    _, g = fn.grad(w, x1, y1)
    _, u = fn.grad(leaves([a - 0.05 * b for a, b in zip(w, g, strict=True)]), x2, y2)
    print(f"\nrelative error of the finite-difference products (||u|| of the step: {norm(u):.3g})")
    print("| ||u|| | delta | paper | scaled |")
    print("|---|---|---|---|")
    for size in (1.0, 10.0, 100.0):
        v = [t * size / norm(u) for t in u]
        exact = hvp_exact(fn, w, v, x3, y3)
        for delta in (1e-2, 1e-3, 1e-4):
            errors = []
            for scaled in (False, True):
                d = hvp_finite_difference(fn, w, v, x3, y3, delta, scaled)
                errors.append(norm([a - b for a, b in zip(d, exact, strict=True)]) / norm(exact))
            print(f"| {size:g} | {delta:g} | {errors[0]:.3g} | {errors[1]:.3g} |")


if __name__ == "__main__":
    main()
