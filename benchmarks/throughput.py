"""Throughput of pfl_mpi against a bare PyTorch FedAvg loop on the same workload.

The workload: FedAvg, 100 clients (iid digits by default), an MLP, E = 1 local epoch, every client
in every round; ``--workload w1`` is issue 15's W1 (100 clients x 200 synthetic samples of 60 features,
MLP 60-256-256-10, batch 32). It runs three times in one invocation, one after the other:

- pfl_mpi: ``mpiexec -n W+1 python -m pfl_mpi run ...`` (rank 0 server, W workers); the figures
  come from the run file (/rounds, /ranks), and the server's CPU is also sampled from /proc.
- pfl_mpi batched: the same run with ``train.client_batch`` = ``--client-batch`` (default auto): each
  worker trains blocks of clients together (training/batched.py). Its metrics are compared with the
  sequential run's (the largest relative difference of the rounds' train_loss and of the final test_acc).
- bare: ``mpiexec -n W python throughput.py --bare ...``: each process trains its share of the
  same clients (same placement, tensors, model shape, batch size, epochs and lr) one after the
  other in a plain PyTorch loop (no DataLoader, no deepcopy, one optimizer), then one Allreduce
  of the weighted sum of updates. No framework code runs inside the timed loop.

Round 0 (warm-up) and the last round (pfl_mpi evaluates every client there) are left out of the
medians. Timings on a shared machine are noisy: compare the ratios of one invocation, and the
CPU-time ratio, which time-sharing with other processes disturbs less than wall time.

    .venv/bin/python benchmarks/throughput.py              # W = 2 workers
    .venv/bin/python benchmarks/throughput.py --workload w1 --workers 1 --rounds 12
    .venv/bin/python benchmarks/throughput.py --workers 3 --rounds 30 --json /tmp/t.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TARGET_RATIO, TARGET_SERVER_CPU = 1.3, 0.05
TARGET_BATCHED_SPEEDUP = 2.0  # issue 15: the batched run against the bare loop
WORKLOAD_KEYS = ("workload", "client_batch", "workers", "rounds", "clients", "data", "hidden", "batch_size")
WORKLOAD_KEYS += ("epochs", "lr", "seed", "repeats")
WORKLOADS = {
    "default": {},
    "w1": {  # 100 clients x 200 training samples (250, 20% test), 60 features, 10 classes
        "data": "synthetic",
        "hidden": [256, 256],
        "batch_size": 32,
        "sets": ["data.synthetic.size_sigma=0", "data.synthetic.size_mean=0", "data.synthetic.size_offset=249"],
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Figures: see benchmarks/README.md")
    p.add_argument("--workers", "-W", type=int, default=2, help="worker processes W (pfl_mpi runs W+1 ranks)")
    p.add_argument("--rounds", type=int, default=32, help="rounds per run (first and last are not in the medians)")
    p.add_argument("--clients", type=int, default=100, help="number of clients, all of them train every round")
    p.add_argument("--data", choices=("digits", "mnist1d", "synthetic"), default="digits", help="data set")
    p.add_argument("--hidden", type=int, nargs="*", default=[64], help="hidden widths of the MLP")
    p.add_argument("--batch-size", type=int, default=10, help="client minibatch size B")
    p.add_argument("--epochs", type=int, default=1, help="local epochs E")
    p.add_argument("--lr", type=float, default=0.05, help="client learning rate")
    p.add_argument("--seed", type=int, default=0, help="run seed (data, placement)")
    p.add_argument("--repeats", type=int, default=1, help="alternate bare and pfl_mpi runs this many times")
    p.add_argument(
        "--workload", choices=tuple(WORKLOADS), default="default", help="w1: sets data, hidden and batch size (W1)"
    )
    p.add_argument("--client-batch", default="auto", help="train.client_batch of the batched run (auto, or K)")
    p.add_argument("--sample", type=float, default=0.1, help="seconds between samples of the server's CPU")
    p.add_argument(
        "--pfl-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra pfl-mpi --set override, e.g. comm.poll_max_ms=1 (repeatable)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--keep", metavar="DIR", help="keep the run files here (default: a temporary directory)")
    p.add_argument("--bare", metavar="OUT", help=argparse.SUPPRESS)  # internal: run as one bare rank
    a = p.parse_args(argv)
    preset = WORKLOADS[a.workload]
    if preset:
        a.data, a.hidden, a.batch_size = preset["data"], preset["hidden"], preset["batch_size"]
        a.pfl_set = [*preset["sets"], *a.pfl_set]
    return a


def pfl_overrides(a: argparse.Namespace, out: Path) -> list[str]:
    """pfl-mpi --set overrides of the workload (no evaluation before the last round, no snapshots)."""
    sets = {
        "name": "throughput",
        "seed": a.seed,
        "rounds": a.rounds,
        "clients_per_round": "null",
        "eval_every": a.rounds + 1,
        "state_every": 0,
        "threads": 1,
        "device": "cpu",
        "output": out,
        "data.name": a.data,
        "data.num_clients": a.clients,
        "model.name": "mlp",
        "model.hidden": json.dumps(a.hidden),
        "train.local_epochs": a.epochs,
        "train.batch_size": a.batch_size,
        "train.lr": a.lr,
        "algorithm.name": "fedavg",
    }
    if a.data != "synthetic":
        sets["data.partition"] = "iid"
    return [f"{k}={v}" for k, v in sets.items()] + a.pfl_set


# -- the bare reference: one process of `mpiexec -n W` --------------------------------------
def bare_rank(a: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F
    from mpi4py import MPI
    from torch import nn

    from pfl_mpi.config import load_config  # set-up only: the same clients as pfl_mpi
    from pfl_mpi.data import load_federated
    from pfl_mpi.runtime.placement import place_clients

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    cfg = load_config(None, pfl_overrides(a, Path(os.devnull)))
    data = load_federated(cfg.data, cfg.seed)
    host = place_clients(data.train_sizes, list(range(1, size + 1)))  # pfl_mpi's worker ranks are 1..W
    mine = [data.client(int(k)) for k in np.flatnonzero(host == rank + 1)]
    clients = [(d.x_train, d.y_train, float(d.y_train.shape[0])) for d in mine]

    torch.manual_seed(a.seed)
    widths = [int(np.prod(data.input_shape)), *a.hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for d_in, d_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], data.num_classes))
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=a.lr)
    w = nn.utils.parameters_to_vector(params).detach().clone()
    sizes = [p.numel() for p in params]
    acc = torch.zeros(w.numel() + 1)
    gen = torch.Generator().manual_seed(a.seed + rank)
    times = np.zeros((a.rounds, 4))  # wall, compute, allreduce, cpu
    for t in range(a.rounds):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        acc.zero_()
        for x, y, n in clients:
            with torch.no_grad():  # a copy: vector_to_parameters would make the parameters views of w, trained in place
                for p, chunk in zip(params, w.split(sizes), strict=True):
                    p.copy_(chunk.view_as(p))
            for _ in range(a.epochs):
                order = torch.randperm(x.shape[0], generator=gen)
                for start in range(0, x.shape[0], a.batch_size):
                    idx = order[start : start + a.batch_size]
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            with torch.no_grad():
                acc[:-1].add_(nn.utils.parameters_to_vector(params) - w, alpha=n)
                acc[-1] += n
        wall1 = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, acc.numpy(), op=MPI.SUM)
        w += acc[:-1] / acc[-1]
        wall2 = time.perf_counter()
        times[t] = (wall2 - wall0, wall1 - wall0, wall2 - wall1, time.process_time() - cpu0)
    everyone = comm.gather(times, root=0)  # small metadata, once
    if rank == 0:
        Path(a.bare).write_text(json.dumps(np.stack(everyone, axis=1).tolist()))  # [round, rank, 4]


# -- the driver ----------------------------------------------------------------------------
def proc_cpu_seconds(pid: int) -> float:
    """CPU seconds of all threads of ``pid`` so far (from /proc/<pid>/task/*/schedstat, in ns)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def find_rank(tag: str, rank: int) -> int | None:
    """The pid of MPI rank ``rank`` of the job whose environment holds ``tag``."""
    want = (f"PFL_BENCH_TAG={tag}".encode(), f"PMI_RANK={rank}".encode())
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(w in env for w in want):
            return int(pid)
    return None


def rounds_completed(path: Path) -> int | None:
    """The run file's commit counter, read without a lock while rank 0 writes it (None if unreadable)."""
    import h5py

    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs["rounds_completed"])
    except Exception:  # not created yet, or caught mid-write: skip this sample
        return None


class ServerWatch(threading.Thread):
    """Samples rank 0's CPU seconds (/proc) and the run file's committed rounds until the job ends."""

    def __init__(self, tag: str, path: Path, every: float):
        super().__init__(daemon=True)
        self.tag, self.path, self.every = tag, path, every
        self.samples: list[tuple[float, float, int]] = []  # (wall, server cpu seconds, rounds completed)
        self.done = threading.Event()

    def run(self) -> None:
        pid = None
        while pid is None and not self.done.is_set():
            pid = find_rank(self.tag, 0)
            time.sleep(0.02)
        while pid is not None and not self.done.is_set():
            committed = rounds_completed(self.path)
            try:
                cpu = proc_cpu_seconds(pid)
            except (OSError, ValueError):
                return
            if committed is not None:
                self.samples.append((time.perf_counter(), cpu, committed))
            time.sleep(self.every)

    def steady(self, rounds: int) -> tuple[float, float]:
        """(server CPU share of a core, seconds per round) between the first sample after round 0 was
        committed and the last sample before round ``rounds - 2`` was: steady rounds only."""
        s = np.array([x for x in self.samples if 1 <= x[2] <= rounds - 2]).reshape(-1, 3)
        if len(s) < 2 or s[-1, 2] == s[0, 2]:
            return float("nan"), float("nan")
        wall, cpu, done = s[-1] - s[0]
        return cpu / wall, wall / done


def launch(cmd: list[str], tag: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PFL_BENCH_TAG": tag}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_bare(a: argparse.Namespace, workdir: Path, i: int) -> tuple[np.ndarray, float]:
    out = workdir / f"bare{i}.json"
    flags = {"rounds": a.rounds, "clients": a.clients, "data": a.data, "hidden": a.hidden, "batch-size": a.batch_size}
    flags.update({"epochs": a.epochs, "lr": a.lr, "seed": a.seed, "workload": a.workload, "bare": out})
    args = [str(x) for k, v in flags.items() for x in (f"--{k}", *(v if isinstance(v, list) else [v]))]
    cmd = [str(BIN / "mpiexec"), "-n", str(a.workers), sys.executable, __file__, *args]
    seconds = launch(cmd, uuid.uuid4().hex)
    return np.array(json.loads(out.read_text())), seconds


def run_pfl(
    a: argparse.Namespace, workdir: Path, i: int, client_batch: str = "1"
) -> tuple[dict, tuple[float, float], float]:
    import h5py

    out, tag = workdir / f"pfl{i}-{client_batch}.h5", uuid.uuid4().hex
    sets = [x for s in [*pfl_overrides(a, out), f"train.client_batch={client_batch}"] for x in ("--set", s)]
    cmd = [str(BIN / "mpiexec"), "-n", str(a.workers + 1), sys.executable, "-m", "pfl_mpi", "run", "--quiet", *sets]
    watch = ServerWatch(tag, out, a.sample)
    watch.start()
    seconds = launch(cmd, tag)
    watch.done.set()
    watch.join()
    with h5py.File(out, "r") as f:
        rounds = {k: v[:] for k, v in f["rounds"].items()}
        rounds.update({f"rank_{k}": v[:] for k, v in f["ranks"].items()})  # [round, rank]
        labels = json.loads(f.attrs["comm_labels"])
        server = f["comm/seconds"][:, 0, :]  # [round, label]
        # The server's seconds in the round's collectives; /comm's "ledger" column is left out: it holds
        # the gather of the previous round (and accumulates over rounds, see the README).
        rounds["server_comm_seconds"] = server[:, [i for i, x in enumerate(labels) if x != "ledger"]].sum(axis=1)
        rounds["client_batch"] = np.full(len(rounds["rank_wall_seconds"]), int(f.attrs["client_batch"]))
    return rounds, watch.steady(a.rounds), seconds


def pfl_figures(a: argparse.Namespace, runs: list[dict], usage: list, job: list, first: list) -> dict:
    """The medians of one kind of pfl_mpi run (``runs``: its steady rounds, pooled over repeats)."""
    r = {k: np.concatenate([p[k] for p in runs]) for k in runs[0]}
    med, workers = np.median, slice(1, None)
    pfl_round = med(r["rank_wall_seconds"][:, workers].max(axis=1))  # a worker's round = the round period
    compute, aggregate, io = med(r["seconds_compute"]), med(r["seconds_aggregate"]), med(r["seconds_io"])
    comm = med(np.maximum(r["server_comm_seconds"] - r["seconds_compute"], 0.0))  # in collectives, not computing
    return {
        "round_seconds": pfl_round,
        "server_round_seconds": med(r["seconds_wall"] + r["seconds_io"]),
        "compute_seconds": compute,
        "comm_seconds": comm,
        "aggregate_seconds": aggregate,
        "io_seconds": io,
        "other_seconds": pfl_round - compute - comm - aggregate - io,
        "worker_cpu_seconds_per_round": med(r["rank_cpu_seconds"][:, workers].sum(axis=1)),
        "updates_per_second": a.clients / pfl_round,
        "server_cpu_file": med(r["server_cpu"]),
        "server_wait_cpu": med(r["server_wait_cpu"]),
        "server_cpu_proc": med([u[0] for u in usage]),
        "round_seconds_from_commits": med([u[1] for u in usage]),
        "job_seconds": med(job),
        "first_round_seconds": med(first),
        "client_batch": int(r["client_batch"][0]),
    }


def largest_difference(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / |b| over the finite entries."""
    keep = np.isfinite(a) & np.isfinite(b)
    return float(np.max(np.abs(a[keep] - b[keep]) / np.maximum(np.abs(b[keep]), 1e-12), initial=0.0))


def measure(a: argparse.Namespace) -> dict:
    """Run the three, ``repeats`` times; return the figures."""
    steady = slice(1, a.rounds - 1)
    kinds = {"pfl": "1", "batched": a.client_batch}
    bare, job_bare, first_bare = [], [], []
    runs: dict = {k: {"rounds": [], "usage": [], "job": [], "first": []} for k in kinds}
    difference = {"train_loss": 0.0, "test_acc": 0.0}
    with tempfile.TemporaryDirectory(prefix="pfl-throughput-") as tmp:
        tmp = a.keep or tmp
        Path(tmp).mkdir(parents=True, exist_ok=True)
        for i in range(a.repeats):
            b, s = run_bare(a, Path(tmp), i)
            bare.append(b[steady])
            job_bare.append(s)
            first_bare.append(b[0, :, 0].max())
            full = {}
            for kind, client_batch in kinds.items():
                r, u, s = run_pfl(a, Path(tmp), i, client_batch)
                full[kind] = r
                runs[kind]["rounds"].append({k: v[steady] for k, v in r.items()})
                runs[kind]["first"].append(r["rank_wall_seconds"][0, 1:].max())
                runs[kind]["usage"].append(u)
                runs[kind]["job"].append(s)
            for name in difference:  # the batched run against the sequential one, every round
                gap = largest_difference(full["batched"][name], full["pfl"][name])
                difference[name] = max(difference[name], gap)
    b = np.concatenate(bare)  # [round, rank, (wall, compute, allreduce, cpu)]
    med = np.median
    bare_round = med(b[:, :, 0].max(axis=1))
    bare_cpu = med(b[:, :, 3].sum(axis=1))
    figures = {k: pfl_figures(a, v["rounds"], v["usage"], v["job"], v["first"]) for k, v in runs.items()}
    pfl, batched = figures["pfl"], figures["batched"]
    return {
        "workload": {k: getattr(a, k) for k in WORKLOAD_KEYS},
        "steady_rounds": int(len(b)),
        "loadavg_after": os.getloadavg(),
        "bare": {
            "round_seconds": bare_round,
            "compute_seconds": med(b[:, :, 1].max(axis=1)),
            "allreduce_seconds": med(b[:, :, 2].max(axis=1)),
            "cpu_seconds_per_round": bare_cpu,
            "updates_per_second": a.clients / bare_round,
            "job_seconds": med(job_bare),
            "first_round_seconds": med(first_bare),
        },
        "pfl": pfl,
        "batched": batched,
        "ratio": pfl["round_seconds"] / bare_round,
        "worker_cpu_ratio": pfl["worker_cpu_seconds_per_round"] / bare_cpu,
        "overhead_share": (pfl["round_seconds"] - bare_round) / pfl["round_seconds"],
        "batched_speedup_over_bare": bare_round / batched["round_seconds"],
        "batched_speedup_over_pfl": pfl["round_seconds"] / batched["round_seconds"],
        "batched_compute_speedup": pfl["compute_seconds"] / batched["compute_seconds"],
        "batched_cpu_speedup_over_bare": bare_cpu / batched["worker_cpu_seconds_per_round"],
        "batched_difference": difference,
    }


def table(f: dict) -> str:
    b, p, q, ms = f["bare"], f["pfl"], f["batched"], lambda s: f"{1e3 * s:.1f} ms"
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    rnd = p["round_seconds"]
    part = lambda s: f"{ms(s)} ({pct(s / rnd)})"  # noqa: E731
    w = f["workload"]
    rows = [
        (
            "workload",
            f"{w['workload']}: {w['clients']} clients x {w['epochs']} epoch, {w['data']}, MLP {w['hidden']}, "
            f"B={w['batch_size']}, W={w['workers']} workers, {f['steady_rounds']} steady rounds",
        ),
        ("client updates / s: bare", f"{b['updates_per_second']:.0f}"),
        ("client updates / s: pfl_mpi", f"{p['updates_per_second']:.0f}"),
        (
            "round time: bare (medians of compute, Allreduce)",
            f"{ms(b['round_seconds'])} ({ms(b['compute_seconds'])} + {ms(b['allreduce_seconds'])})",
        ),
        ("round time: pfl_mpi (a worker's round period)", ms(rnd)),
        ("round time: pfl_mpi (server: seconds_wall + seconds_io)", ms(p["server_round_seconds"])),
        ("round time: pfl_mpi (watching the file's commits; a mean)", ms(p["round_seconds_from_commits"])),
        ("pfl_mpi compute (slowest worker's client loop)", part(p["compute_seconds"])),
        ("pfl_mpi communication (server in collectives - compute)", part(p["comm_seconds"])),
        ("pfl_mpi aggregation", part(p["aggregate_seconds"])),
        ("pfl_mpi I/O (HDF5 round record, flush)", part(p["io_seconds"])),
        ("pfl_mpi other (rest of the round period)", part(p["other_seconds"])),
        ("framework overhead share (pfl - bare) / pfl", pct(f["overhead_share"])),
        (f"**time ratio pfl / bare** (target < {TARGET_RATIO})", f"**{f['ratio']:.2f}**"),
        (
            "CPU s per round of all W workers: bare / pfl_mpi",
            f"{b['cpu_seconds_per_round']:.3f} / {p['worker_cpu_seconds_per_round']:.3f}",
        ),
        ("worker CPU ratio pfl / bare", f"{f['worker_cpu_ratio']:.2f}"),
        (
            f"**server CPU**, /proc over steady rounds (target < {pct(TARGET_SERVER_CPU)})",
            f"**{pct(p['server_cpu_proc'])}**",
        ),
        ("server CPU, the file's server_cpu (the whole round, HDF5 writing included)", pct(p["server_cpu_file"])),
        ("server CPU while waiting in collectives (the file's server_wait_cpu)", pct(p["server_wait_cpu"])),
        (
            "first round (warm-up, not in the medians): bare / pfl_mpi",
            f"{ms(b['first_round_seconds'])} / {ms(p['first_round_seconds'])}",
        ),
        ("whole job incl. start-up: bare / pfl_mpi", f"{b['job_seconds']:.1f} s / {p['job_seconds']:.1f} s"),
        (f"batched: train.client_batch {w['client_batch']} -> K", f"{q['client_batch']}"),
        ("client updates / s: pfl_mpi batched", f"{q['updates_per_second']:.0f}"),
        ("round time: pfl_mpi batched (a worker's round period)", ms(q["round_seconds"])),
        ("pfl_mpi batched compute (slowest worker's client loop)", ms(q["compute_seconds"])),
        ("compute speed-up batched / sequential pfl_mpi", f"{f['batched_compute_speedup']:.2f}"),
        ("round speed-up batched / sequential pfl_mpi", f"{f['batched_speedup_over_pfl']:.2f}"),
        (
            f"**round speed-up batched / bare** (target >= {TARGET_BATCHED_SPEEDUP})",
            f"**{f['batched_speedup_over_bare']:.2f}**",
        ),
        ("CPU s per round of all W workers: pfl_mpi batched", f"{q['worker_cpu_seconds_per_round']:.3f}"),
        ("worker CPU speed-up batched / bare", f"{f['batched_cpu_speedup_over_bare']:.2f}"),
        (
            "largest relative difference batched vs sequential: train_loss / final test_acc",
            f"{f['batched_difference']['train_loss']:.1e} / {f['batched_difference']['test_acc']:.1e}",
        ),
        ("load average after the runs", " ".join(f"{x:.2f}" for x in f["loadavg_after"])),
    ]
    return "\n".join(["| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.bare:
        bare_rank(a)
        return 0
    figures = measure(a)
    print(table(figures))
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
