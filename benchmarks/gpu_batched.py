"""Sequential against batched client training on one device: the library's loop one client at a time, a bare
PyTorch loop (throughput.py's), and blocks of K clients (training/batched.py) for K in {1, 10, 50, 100}; and, for
each K, the batched GEMMs alone (the bound: what a round of blocks of K would take if nothing but its GEMMs ran).

The workload is issue 15's W1: 100 clients x 200 samples (60 float features, 10 classes), the MLP
60-256-256-10, batch 32, one local epoch of plain SGD: 7 steps per client, one round = 700 client steps.
Every configuration trains the same clients from the same start with the same permutations; the script
checks that the batched parameters equal the sequential ones (the largest relative difference is printed)
and reports the median wall time over ``--repeats`` rounds after one warm-up round (the paths interleaved:
each repetition times every path once), and the speed-ups in the least process CPU time of a round over the
library's loop and over the bare loop (steadier than wall time on a shared CPU; on a GPU read the wall time,
the host's CPU time is not the device's). Runs on any GPU node
(``--device cuda``, the default when one is visible) and on the CPU.

    .venv/bin/python benchmarks/gpu_batched.py
    .venv/bin/python benchmarks/gpu_batched.py --device cuda:0 --repeats 5 --blocks 1 10 50 100 200
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from pfl_mpi.training.batched import batched_local_training
from pfl_mpi.training.loop import TrainConfig, local_training, make_optimizer
from pfl_mpi.training.stacked import blocks, stack


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--clients", type=int, default=100, help="clients per round")
    p.add_argument("--samples", type=int, default=200, help="training samples per client")
    p.add_argument("--hidden", type=int, nargs="*", default=[256, 256], help="hidden widths of the MLP")
    p.add_argument("--batch-size", type=int, default=32, help="minibatch size B")
    p.add_argument("--blocks", type=int, nargs="*", default=[1, 10, 50, 100], help="the block sizes K to time")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per configuration (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(0)
    widths = [60, *a.hidden]
    layers: list[nn.Module] = []
    for d_in, d_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], 10)).to(device)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(a.samples, 60, generator=g).to(device), torch.randint(0, 10, (a.samples,), generator=g).to(device))
        for _ in range(a.clients)
    ]
    cfg = TrainConfig(batch_size=a.batch_size, lr=0.05)

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(100 + i) for i in range(a.clients)]

    def sequential() -> list[dict[str, torch.Tensor]]:
        out, params = [], list(model.parameters())
        for (x, y), gen in zip(data, generators(), strict=True):
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(start[n])
            local_training(model, x, y, cfg, gen, optimizer=make_optimizer(params, cfg))
            out.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return out

    def batched(k: int) -> list[dict[str, torch.Tensor]]:
        out, gens = [], generators()
        for block in blocks(list(range(a.clients)), k):
            stacked = stack([start] * len(block))
            batched_local_training(model, stacked, [data[i] for i in block], [gens[i] for i in block], cfg, cfg.lr)
            out += [{n: t[j] for n, t in stacked.items()} for j in range(len(block))]
        return out

    def bare() -> list[dict[str, torch.Tensor]]:
        """The plain PyTorch loop of throughput.py's bare ranks: one torch.optim.SGD, no library code."""
        out, params = [], list(model.parameters())
        opt = torch.optim.SGD(params, lr=cfg.lr)
        for (x, y), gen in zip(data, generators(), strict=True):
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(start[n])
            order = torch.randperm(x.shape[0], generator=gen).to(device)
            for first in range(0, x.shape[0], a.batch_size):
                idx = order[first : first + a.batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            out.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return out

    def gemms_only(k: int) -> None:
        """The batched GEMMs of a round in blocks of k (what chain_sgd.py runs: per step and layer a forward GEMM,
        an input-gradient GEMM but for the first layer, a weight-update GEMM), and nothing else: the bound."""
        for block in blocks(list(range(a.clients)), k):
            w = [t.clone() for n, t in stack([start] * len(block)).items() if n.endswith("weight")]
            x = torch.randn(len(block), w[0].shape[2], a.batch_size, device=device)
            for _ in range(-(-a.samples // a.batch_size)):
                acts = [x]
                for weight in w:
                    acts.append(torch.bmm(weight, acts[-1]))
                g = acts.pop()
                for i in range(len(w) - 1, -1, -1):
                    g_in = torch.bmm(w[i].transpose(1, 2), g) if i else None
                    w[i].baddbmm_(g, acts[i].transpose(1, 2), alpha=-1e-12)
                    g = g_in

    runs = {"sequential": sequential, "bare loop": bare}
    runs.update({f"batched K={k}": (lambda k=k: batched(k)) for k in a.blocks})
    runs.update({f"GEMMs only K={k}": (lambda k=k: gemms_only(k)) for k in a.blocks})
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    results = {name: run() for name, run in runs.items()}  # warm-up
    for _ in range(a.repeats):  # interleaved: each repetition times every path once
        for name, run in runs.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            sync(device)
            seconds[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    steps = a.clients * -(-a.samples // a.batch_size)
    base, base_cpu, reference = statistics.median(seconds["sequential"]), min(cpu["sequential"]), results["sequential"]
    bare_cpu = min(cpu["bare loop"])
    print(f"device {device}, {a.clients} clients x {a.samples} samples, MLP {widths + [10]}, B={a.batch_size}")
    head = f"{'path':<18}{'round (ms)':>12}{'client steps/s':>16}{'speed-up':>10}{'CPU speed-up':>14}"
    print(head + f"{'CPU vs bare':>13}{'max rel. diff':>15}")
    for name in runs:
        wall, least, result = statistics.median(seconds[name]), min(cpu[name]), results[name]
        diff = "" if result is None else f"{max(_difference(r, s) for r, s in zip(result, reference, strict=True)):.1e}"
        line = f"{name:<18}{1e3 * wall:>12.1f}{steps / wall:>16.0f}{base / wall:>10.2f}{base_cpu / least:>14.2f}"
        print(line + f"{bare_cpu / least:>13.2f}{diff:>15}")
    print("load average", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


def _difference(result: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """The largest relative difference of any parameter (max |a - b| / max |b|)."""
    return max(float((result[n] - r).abs().max() / r.abs().max().clamp_min(1e-12)) for n, r in reference.items())


if __name__ == "__main__":
    raise SystemExit(main())
