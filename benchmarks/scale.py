"""Scale: FedPer with N = 10, 100, 1,000 clients and S = 10, 50, 100 sampled per round, on 4 ranks.

Each configuration is one ``pfl-mpi run`` under ``mpiexec -n 4`` (rank 0 the server, 3 workers).
Every rank runs inside a small wrapper (this script, ``--rank``) that, when the run ends, writes the
rank's peak resident memory (``getrusage`` ru_maxrss: the whole process, start-up and the final
write included). Round times and bytes come from the run file. It prints one table and, with
``--md``/``--plot``, writes it as markdown and draws round time and peak memory against N and S.

The workload: FedProx's Synthetic(1, 1) (natural split, so any N works; each client holds at most
100 samples), an MLP 60-256-256-10 whose last two layers are FedPer's personal head (68,362 floats,
267 KiB per client: 261 MiB for 1,000 clients), 1 local epoch, batch 10. No evaluation before the last
round, snapshot only after it.

    .venv/bin/python benchmarks/scale.py                        # the 7 configurations, about 2 minutes
    .venv/bin/python benchmarks/scale.py --repeats 3 --md benchmarks/scale-results.md --plot benchmarks/scale.png
    .venv/bin/python benchmarks/scale.py --clients 1000 --sampled 10 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
MIB = 1 << 20
# the rank of this process under the common launchers (Hydra and srun's PMI-2 set PMI_RANK)
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


def workload(clients: int, sampled: int, rounds: int, out: Path) -> dict[str, object]:
    """pfl-mpi --set overrides of one configuration."""
    return {
        "name": f"scale-n{clients}-s{sampled}",
        "seed": 0,
        "rounds": rounds,
        "clients_per_round": sampled,
        "eval_every": rounds + 1,  # only the last round evaluates (it always does)
        "state_every": 0,  # one snapshot, after the last round
        "threads": 1,
        "device": "cpu",
        "output": str(out),
        "data.name": "synthetic",
        "data.num_clients": clients,
        "data.synthetic.max_samples": 100,
        "model.name": "mlp",
        "model.hidden": "[256, 256]",
        "model.head_layers": 2,
        "train.local_epochs": 1,
        "train.batch_size": 10,
        "train.lr": 0.01,
        "algorithm.name": "fedper",
    }


@dataclass
class Result:
    clients: int
    sampled: int
    ranks: int
    peak_bytes: list[int]  # per rank, rank order
    round_seconds: float  # median of /rounds/seconds_wall over the training rounds (not round 0, not the last)
    compute_seconds: float  # median /rounds/seconds_compute (slowest worker's client loop), same rounds
    io_seconds: float  # median /rounds/seconds_io (the server writing a round, overlapped with training)
    last_round_seconds: float  # the last round: it also evaluates every one of the N clients
    bytes_per_round: float  # median bytes moved per training round (algorithm and bookkeeping)
    hosted_bytes: float  # the most any worker holds of its clients' data and personal state (computed)
    file_bytes: int
    job_seconds: float  # the whole mpiexec command

    @property
    def total_peak(self) -> int:
        return int(sum(self.peak_bytes))


# -- one rank, inside mpiexec ---------------------------------------------------------------
def rank_main(out_dir: Path, argv: list[str]) -> int:
    """Run ``pfl-mpi argv`` in this process, then write this rank's peak RSS (bytes) to ``out_dir``."""
    from pfl_mpi.cli import main

    code = main(argv)
    rank = next((os.environ[v] for v in RANK_VARIABLES if v in os.environ), "0")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    (out_dir / f"peak-{rank}.json").write_text(json.dumps({"rank": int(rank), "peak_bytes": int(peak)}))
    return code


# -- the driver -----------------------------------------------------------------------------
def measure(clients: int, sampled: int, rounds: int, ranks: int, work: Path) -> Result:
    """Run one configuration on ``ranks`` ranks and read its figures."""
    out = work / f"n{clients}-s{sampled}"
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("peak-*.json"):  # from an earlier run kept in the same directory
        stale.unlink()
    run_file = out / "run.h5"
    sets = workload(clients, sampled, rounds, run_file)
    cmd = [str(MPIEXEC), "-n", str(ranks), sys.executable, str(Path(__file__).resolve()), "--rank", str(out), "--"]
    cmd += ["run", "--quiet", "--overwrite", *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]
    env = dict(os.environ, OMP_NUM_THREADS="1", MPIEXEC_TIMEOUT=os.environ.get("MPIEXEC_TIMEOUT", "600"))
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    job = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    peaks = sorted((json.loads(p.read_text()) for p in out.glob("peak-*.json")), key=lambda r: r["rank"])
    if [p["rank"] for p in peaks] != list(range(ranks)):
        raise RuntimeError(f"expected a peak from each of {ranks} ranks, got {[p['rank'] for p in peaks]}")
    return _read_run(run_file, clients, sampled, ranks, [p["peak_bytes"] for p in peaks], job)


def _read_run(path: Path, clients: int, sampled: int, ranks: int, peaks: list[int], job: float) -> Result:
    import h5py

    with h5py.File(path, "r") as f:
        r = f["rounds"]
        done = int(f.attrs["rounds_completed"])
        steady = slice(1, done - 1)  # round 0 starts up, the last one evaluates all N clients
        moved = r["bytes_down"][:done] + r["bytes_up"][:done] + r["bytes_other"][:done]
        part = f["partition"]
        samples = part["train_sizes"][...] + part["test_sizes"][...]
        host = part["host_rank"][...]
        head = f["clients/state/personal"].shape[-1] if "clients/state/personal" in f else 0
        dimension = 60  # Synthetic's input dimension: x float32 [n, 60], y int64 [n]
        per_client = samples * (4 * dimension + 8) + 4 * head
        hosted = max(float(per_client[host == rank].sum()) for rank in range(1, ranks))
        return Result(
            clients=clients,
            sampled=sampled,
            ranks=ranks,
            peak_bytes=peaks,
            round_seconds=float(np.median(r["seconds_wall"][steady])),
            compute_seconds=float(np.median(r["seconds_compute"][steady])),
            io_seconds=float(np.median(r["seconds_io"][steady])),
            last_round_seconds=float(r["seconds_wall"][done - 1]),
            bytes_per_round=float(np.median(moved[steady])),
            hosted_bytes=hosted,
            file_bytes=path.stat().st_size,
            job_seconds=job,
        )


def combine(runs: list[Result]) -> Result:
    """Repeats of one configuration: each rank's largest peak, and the median of every time."""
    med = {f: float(np.median([getattr(x, f) for x in runs])) for f in ("round_seconds", "compute_seconds")}
    med |= {f: float(np.median([getattr(x, f) for x in runs])) for f in ("io_seconds", "last_round_seconds")}
    med |= {"bytes_per_round": float(np.median([x.bytes_per_round for x in runs]))}
    med |= {"job_seconds": float(np.median([x.job_seconds for x in runs]))}
    peaks = [int(p) for p in np.max([x.peak_bytes for x in runs], axis=0)]
    first = runs[0]
    return Result(
        clients=first.clients,
        sampled=first.sampled,
        ranks=first.ranks,
        peak_bytes=peaks,
        hosted_bytes=first.hosted_bytes,
        file_bytes=first.file_bytes,
        **med,
    )


def table(results: list[Result]) -> str:
    head = (
        "| N | S | peak RSS per rank, MiB (server, workers) | sum MiB | hosted data+state per worker MiB | "
        "round s (median) | compute s | write s | bytes / round | last round s (evaluates N) | file MiB | job s |"
    )
    lines = [head, "|" + "---:|" * (head.count("|") - 1)]
    for x in results:
        per_rank = ", ".join(f"{p / MIB:.0f}" for p in x.peak_bytes)
        lines.append(
            f"| {x.clients} | {x.sampled} | {per_rank} | {x.total_peak / MIB:.0f} | {x.hosted_bytes / MIB:.1f} | "
            f"{x.round_seconds:.3f} | {x.compute_seconds:.3f} | {x.io_seconds:.3f} | {x.bytes_per_round:.3g} | "
            f"{x.last_round_seconds:.2f} | {x.file_bytes / MIB:.0f} | {x.job_seconds:.1f} |"
        )
    return "\n".join(lines)


def markdown(text: str, command: str, load: str) -> str:
    """The table with its command and how to read it."""
    return f"""# Scale benchmark: measured

`{command}` on 4 ranks (1 server, 3 workers) of a 2-core machine shared with other jobs (load average
after the runs: {load}). FedPer on Synthetic(1, 1), at most 100 samples per client, MLP 60-256-256-10
with the last two layers personal (68,362 floats, 267 KiB per client), 1 local epoch, batch 10.

{text}

- **peak RSS**: `getrusage` ru_maxrss of each rank's whole process (largest over repeats), rank 0 first.
- **hosted data+state**: computed, the most any worker holds of its clients' tensors and heads.
- **round s**: median over the training rounds (not round 0, not the last) of `/rounds/seconds_wall`,
  the server's round period; **compute s** the slowest worker's client loop; **write s** the server
  writing a round (overlapped with the next round's training). Medians over repeats.
- **bytes / round**: every message of a training round (algorithm and bookkeeping), from `/rounds`.
- **last round s**: the last round also evaluates every one of the N clients.
"""


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({x.clients for x in results})
    ss = sorted({x.sampled for x in results})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for n in ns:
        pts = sorted((x.sampled, x.round_seconds) for x in results if x.clients == n)
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"N = {n}")
    ax.set(xlabel="sampled clients per round S", ylabel="median round time (s)", title="round time grows with S")
    ax.legend()
    ax = axes[1]
    for s in ss:
        pts = sorted((x.clients, x.round_seconds) for x in results if x.sampled == s)
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"S = {s}")
    ax.set(xscale="log", xlabel="clients N", ylabel="median round time (s)", title="... and not with N")
    ax.legend()
    ax = axes[2]
    for s, style in zip(ss, ("-", "--", ":"), strict=False):
        rows = sorted((x for x in results if x.sampled == s), key=lambda x: x.clients)
        n = [x.clients for x in rows]
        ax.plot(n, [x.peak_bytes[0] / MIB for x in rows], "o" + style, color="C0", label=f"server, S = {s}")
        workers = [max(x.peak_bytes[1:]) / MIB for x in rows]
        ax.plot(n, workers, "s" + style, color="C1", label=f"largest worker, S = {s}")
    ax.set(xscale="log", xlabel="clients N", ylabel="peak RSS (MiB)", title="peak memory per rank")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    fig.suptitle("FedPer on Synthetic(1, 1), MLP 60-256-256-10 (head personal), 4 ranks on 2 cores")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the paper plan: 10,000 clients on 257 ranks (docs/scale.md) -----------------------------
PLAN_CLIENTS, PLAN_RANKS = 10_000, 257  # 64 nodes x 4 GPUs, one worker per GPU, plus the server
PLAN_MODELS = {  # name -> model overrides: the benchmark's MLP, and a wide one of 8.5 M parameters
    "A: MLP 60-256-256-10, head = last 2 layers": {"model.hidden": "[256, 256]", "model.head_layers": 2},
    "B: MLP 60-2048-2048-2048-10, head = last layer": {"model.hidden": "[2048, 2048, 2048]", "model.head_layers": 1},
}
# ASSUMED, not measured: HDR InfiniBand (200 Gb/s), host buffers. alpha: MPI latency of one message;
# beta: s per byte at 24 GB/s; gamma: s per byte of the reduction's add (numpy's add, about 10 GB/s here).
ASSUMED_IB = {"alpha": 1.5e-6, "beta": 1 / 24e9, "gamma": 1 / 10e9}


def ib_seconds(op: str, nbytes: float, ranks: int, alpha: float, beta: float, gamma: float) -> float:
    """Seconds of one collective over ``ranks`` ranks from link figures, with the costs of MPICH's algorithms
    (Thakur, Rabenseifner and Gropp 2005), taking the cheaper of the short- and long-message algorithm.
    ``nbytes`` is per rank, as in ``bench comm``: the Bcast/Reduce buffer, a Gatherv's part per worker."""
    p, lg, n = ranks, math.ceil(math.log2(ranks)), nbytes
    if op == "Bcast":  # binomial tree; scatter + ring allgather (van de Geijn)
        return min(lg * (alpha + n * beta), (lg + p - 1) * alpha + 2 * (p - 1) / p * n * beta)
    if op in ("Reduce", "Allreduce"):  # binomial tree; reduce-scatter + gather (Rabenseifner)
        long = 2 * lg * alpha + 2 * (p - 1) / p * n * beta + (p - 1) / p * n * gamma
        return min(lg * (alpha + n * (beta + gamma)), long)
    if op in ("Gatherv", "Scatterv"):  # the root's link carries every worker's part
        return lg * alpha + (p - 1) * n * beta
    raise ValueError(op)


def plan_tables(bench_file: Path, sampled: tuple[int, ...] = (100, 1000)) -> str:
    """Per model, algorithm and S: the messages of one training round of 10,000 clients on 257 ranks
    (``round_messages``, the model of ``pfl-mpi bench comm``), timed with the alpha-beta fits measured in
    ``bench_file`` and with the assumed InfiniBand figures."""
    from pfl_mpi.config import load_config
    from pfl_mpi.costmodel import round_messages
    from pfl_mpi.costmodel.report import fit_all, read_h5

    sizes, times, attrs = read_h5(bench_file)
    fits = fit_all(sizes, times)
    base = {"rounds": 10, "eval_every": 11, "state_every": 0, "data.name": "synthetic"}
    base |= {"data.num_clients": PLAN_CLIENTS, "data.synthetic.max_samples": 100}
    out = [
        f"alpha-beta fits from {bench_file} ({attrs.get('ranks')} ranks on this machine); assumed InfiniBand: "
        f"alpha {ASSUMED_IB['alpha'] * 1e6:g} us, {1e-9 / ASSUMED_IB['beta']:g} GB/s, reduction "
        f"{1e-9 / ASSUMED_IB['gamma']:g} GB/s, P = {PLAN_RANKS}\n"
    ]
    for model, model_sets in PLAN_MODELS.items():
        for algorithm in ("fedavg", "fedper"):
            for s in sampled:
                sets = base | model_sets | {"algorithm.name": algorithm, "clients_per_round": s}
                cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
                messages = round_messages(cfg, PLAN_RANKS, t=1)
                out += [
                    f"**{model}; {algorithm}; N = {PLAN_CLIENTS:,}, S = {s}, P = {PLAN_RANKS}**\n",
                    "| label | op | bytes per rank | bytes, all workers | ms, fit here "
                    f"(P = {attrs.get('ranks')}) | ms, assumed IB |",
                    "|---|---|---:|---:|---:|---:|",
                ]
                total = np.zeros(2)
                for m in messages:
                    every = m.nbytes * (PLAN_RANKS - 1)  # as the ledger counts: each worker's part
                    here = float(fits[m.op].predict(m.nbytes))
                    ib = ib_seconds(m.op, m.nbytes, PLAN_RANKS, **ASSUMED_IB)
                    total += (here, ib)
                    out.append(
                        f"| {m.label} | {m.op} | {m.nbytes:,.0f} | {every:,.0f} | {1e3 * here:.3f} | {1e3 * ib:.3f} |"
                    )
                out += [f"| **round** | | | | **{1e3 * total[0]:.2f}** | **{1e3 * total[1]:.2f}** |", ""]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000], help="values of N")
    p.add_argument("--sampled", type=int, nargs="+", default=[10, 50, 100], help="values of S (those <= N run)")
    p.add_argument("--rounds", type=int, default=8, help="rounds per run (round 0 and the last are not in medians)")
    p.add_argument("--ranks", type=int, default=4, help="MPI ranks (1 server + ranks - 1 workers)")
    p.add_argument(
        "--repeats", type=int, default=1, help="run every configuration this many times (largest peaks, median times)"
    )
    p.add_argument("--md", metavar="PATH", help="write the table and the command as markdown")
    p.add_argument("--plot", metavar="PNG", help="draw round time and peak memory against N and S")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--keep", metavar="DIR", help="keep the run files here (default: a temporary directory)")
    p.add_argument(
        "--plan",
        metavar="BENCH.h5",
        help="instead: print the predicted messages of 10,000 clients on 257 ranks, timed with the fits of this "
        "'pfl-mpi bench comm' result file and with assumed InfiniBand figures (docs/scale.md)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rank"]:  # one rank inside mpiexec: --rank DIR -- <pfl-mpi arguments>
        return rank_main(Path(argv[1]), argv[3:])
    a = parse_args(argv)
    if a.plan:
        print(plan_tables(Path(a.plan)))
        return 0
    if a.rounds < 3:
        print("scale.py: --rounds must be at least 3 (round 0 and the last are left out)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pfl-scale-") as tmp:
        work = Path(a.keep) if a.keep else Path(tmp)
        results = []
        configs = [(n, s) for n in a.clients for s in a.sampled if s <= n]
        runs: dict[tuple[int, int], list[Result]] = {c: [] for c in configs}
        for repeat in range(a.repeats):  # interleaved, so that a burst of load spreads over configurations
            for n, s in configs:
                runs[n, s].append(measure(n, s, a.rounds, a.ranks, work / f"r{repeat}"))
                print(f"N = {n}, S = {s}: done in {runs[n, s][-1].job_seconds:.1f} s", file=sys.stderr, flush=True)
        results = [combine(runs[c]) for c in configs]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = table(results)
    print(text)
    print(f"\nload average after the runs: {load}")
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(x) for x in results], indent=1))
    if a.md:
        Path(a.md).write_text(markdown(text, "python benchmarks/scale.py " + " ".join(argv), load))
    if a.plot:
        plot(results, Path(a.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
