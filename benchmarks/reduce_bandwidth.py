"""Bandwidth of MPI Reduce and Allreduce on float32 buffers, next to numpy's in-memory add.

Run it under mpiexec (it is a benchmark of MPI itself, so it calls mpi4py's uppercase buffer
methods directly):

    .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/reduce_bandwidth.py
    .venv/bin/mpiexec -n 4 .venv/bin/python benchmarks/reduce_bandwidth.py --sizes 1 10 100 --repeats 7

For each size, every operation runs once untimed, then ``--repeats`` times between barriers; a
repetition's time is the slowest rank's. Figures are medians over the repetitions.

GB/s counts one buffer's bytes per operation: size / seconds (1 GB = 1e9 bytes), whatever the
algorithm moves underneath (a P-rank Reduce reads P buffers; np.add reads two and writes one).
"ratio" is that bandwidth over np.add(a, b, out=c) on the same buffers, timed on rank 0 while
the other ranks wait without spinning: the in-memory sum is what a reduce cannot beat.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from mpi4py import MPI


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 100], help="buffer sizes in MB (1e6 bytes)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per size and operation")
    return p.parse_args()


def quiet_barrier(comm: MPI.Comm) -> None:
    """A barrier that sleeps instead of spinning, so waiting ranks leave the cores to the busy one."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(1e-3)


def time_collective(comm: MPI.Comm, op, repeats: int) -> float:
    """Median over repetitions of the slowest rank's seconds for ``op()``."""
    op()  # warm-up: first touch of the pages, MPI's shared-memory set-up
    times = []
    for _ in range(repeats):
        comm.Barrier()
        start = time.perf_counter()
        op()
        times.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
    return float(np.median(times))


def time_numpy_add(a: np.ndarray, b: np.ndarray, c: np.ndarray, repeats: int) -> float:
    np.add(a, b, out=c)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.add(a, b, out=c)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_size(comm: MPI.Comm, nbytes: int, repeats: int) -> dict[str, float]:
    """Median seconds of np.add (rank 0 only), Reduce and Allreduce on float32 buffers of ``nbytes``."""
    rank, size = comm.Get_rank(), comm.Get_size()
    n = nbytes // 4
    a = np.full(n, rank + 1, dtype=np.float32)
    b = np.ones(n, dtype=np.float32)
    c = np.empty(n, dtype=np.float32)
    expected = size * (size + 1) / 2
    seconds = {}
    quiet_barrier(comm)
    if rank == 0:
        seconds["np.add (rank 0)"] = time_numpy_add(a, b, c, repeats)
    quiet_barrier(comm)
    root_buf = c if rank == 0 else None
    seconds["Reduce"] = time_collective(comm, lambda: comm.Reduce(a, root_buf, op=MPI.SUM, root=0), repeats)
    assert rank != 0 or c[0] == expected, "Reduce gave a wrong sum"
    seconds["Allreduce"] = time_collective(comm, lambda: comm.Allreduce(a, c, op=MPI.SUM), repeats)
    assert c[-1] == expected, "Allreduce gave a wrong sum"
    return seconds


def main() -> None:
    args = parse_args()
    comm = MPI.COMM_WORLD
    rows = []
    for mb in args.sizes:
        nbytes = int(mb * 1e6) // 4 * 4
        seconds = measure_size(comm, nbytes, args.repeats)
        if comm.Get_rank() == 0:
            base = nbytes / seconds["np.add (rank 0)"]
            rows += [(f"{mb:g}", op, s, nbytes / s / 1e9, nbytes / s / base) for op, s in seconds.items()]
    if comm.Get_rank() == 0:
        version = MPI.Get_library_version().splitlines()[0].strip()
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"{comm.Get_size()} ranks, {version}, median of {args.repeats}, load average {load}")
        print("| size MB | op | median s | GB/s | ratio to np.add |")
        print("|---:|---|---:|---:|---:|")
        for mb, op, s, gbs, ratio in rows:
            print(f"| {mb} | {op} | {s:.5f} | {gbs:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
