"""Sequential against batched client training on one device: the library's loop one client at a time, and
blocks of K clients (training/batched.py) for K in {1, 10, 50, 100}.

The workload is issue 15's W1: 100 clients x 200 samples (60 float features, 10 classes), the MLP
60-256-256-10, batch 32, one local epoch of plain SGD: 7 steps per client, one round = 700 client steps.
Every configuration trains the same clients from the same start with the same permutations; the script
checks that the batched parameters equal the sequential ones (the largest relative difference is printed)
and reports the median wall time over ``--repeats`` rounds after one warm-up round, and the speed-up in the
least process CPU time of a round (steadier than wall time on a shared CPU; on a GPU read the wall time,
the host's CPU time is not the device's). Runs on any GPU node
(``--device cuda``, the default when one is visible) and on the CPU.

    .venv/bin/python benchmarks/gpu_batched.py
    .venv/bin/python benchmarks/gpu_batched.py --device cuda:0 --repeats 5 --blocks 1 10 50 100 200
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
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

    def timed(run) -> tuple[float, float, list[dict[str, torch.Tensor]]]:
        """Median wall seconds and least process CPU seconds of a round (after a warm-up), and its result."""
        result = run()  # warm-up
        seconds, cpu = [], []
        for _ in range(a.repeats):
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            result = run()
            sync(device)
            seconds.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        return statistics.median(seconds), min(cpu), result

    steps = a.clients * -(-a.samples // a.batch_size)
    base, base_cpu, reference = timed(sequential)
    print(f"device {device}, {a.clients} clients x {a.samples} samples, MLP {widths + [10]}, B={a.batch_size}")
    head = f"{'path':<16}{'round (ms)':>12}{'client steps/s':>16}{'speed-up':>10}{'CPU speed-up':>14}"
    print(head + f"{'max rel. diff':>15}")
    print(f"{'sequential':<16}{1e3 * base:>12.1f}{steps / base:>16.0f}{1.0:>10.2f}{1.0:>14.2f}{0.0:>15.1e}")
    for k in a.blocks:
        seconds, cpu, result = timed(lambda k=k: batched(k))
        diff = max(
            float((r[n] - s[n]).abs().max() / s[n].abs().max().clamp_min(1e-12))
            for r, s in zip(result, reference, strict=True)
            for n in s
        )
        label, rate = f"batched K={k}", steps / seconds
        line = f"{label:<16}{1e3 * seconds:>12.1f}{rate:>16.0f}{base / seconds:>10.2f}{base_cpu / cpu:>14.2f}"
        print(line + f"{diff:>15.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
