"""CSV export of a run file (committed rounds only), with the csv module.

Files: rounds.csv (one row per round, one column per /rounds metric), clients.csv (long format:
one row per round and client, one column per /clients metric), comm.csv (one row per round, rank
and label), ranks.csv (one row per round and rank), partition.csv (one row per client).
``round`` is the 0-based index stored in the file (progress lines show round + 1). Columns that count
(round, rank, client, num_sampled, world_size, calls, participated, bytes_*, protocol_bytes_*, label_*)
are written as integers; other floats with ``repr`` (they read back exactly); NaN is written ``nan``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .load import Run, load_run

# columns that count things (stored as float64 in the file, like every /rounds metric): written as integers
INTEGER_NAMES = ("round", "rank", "client", "num_sampled", "world_size", "calls", "participated")
INTEGER_PREFIXES = ("bytes_", "protocol_bytes_", "label_")


def is_integer_column(name: str) -> bool:
    return name in INTEGER_NAMES or name.startswith(INTEGER_PREFIXES)


def _value(v) -> str:
    if isinstance(v, (np.floating, float)):
        return repr(float(v))
    if isinstance(v, (np.integer, np.bool_)):
        return str(int(v))
    return str(v)


def _integer(v) -> str:
    """An integer column's value: integral numbers as integers, anything else (NaN) as a float."""
    x = float(v)
    return str(int(x)) if np.isfinite(x) and x == int(x) else repr(x)


def _write(path: Path, header: list[str], rows) -> Path:
    formats = [_integer if is_integer_column(name) else _value for name in header]
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        for row in rows:
            out.writerow([fmt(v) for fmt, v in zip(formats, row, strict=True)])
    return path


def _ordered(names, first: tuple[str, ...]) -> list[str]:
    return [n for n in first if n in names] + sorted(n for n in names if n not in first)


def rounds_csv(run: Run, path: Path) -> Path:
    names = _ordered(run.rounds, ("round",))
    columns = [run.rounds[n] for n in names]
    return _write(path, names, (row for row in zip(*columns, strict=True)))


def clients_csv(run: Run, path: Path) -> Path:
    names = _ordered(run.clients, ("participated",))
    num = run.clients[names[0]].shape[1] if names else 0

    def rows():
        for t in range(run.rounds_completed):
            for k in range(num):
                yield (t, k, *(run.clients[n][t, k] for n in names))

    return _write(path, ["round", "client", *names], rows())


def comm_csv(run: Run, path: Path) -> Path:
    fields = [f for f in run.attrs.get("comm_fields", sorted(run.comm)) if f in run.comm]
    tables = [run.comm[f] for f in fields]

    def rows():
        for t in range(run.rounds_completed):
            for rank in range(tables[0].shape[1]):
                for j, label in enumerate(run.comm_labels):
                    yield (t, rank, label, *(table[t, rank, j] for table in tables))

    return _write(path, ["round", "rank", "label", *fields], rows() if tables else ())


def ranks_csv(run: Run, path: Path) -> Path:
    fields = [f for f in run.attrs.get("rank_fields", sorted(run.ranks)) if f in run.ranks]
    tables = [run.ranks[f] for f in fields]

    def rows():
        for t in range(run.rounds_completed):
            for rank in range(tables[0].shape[1]):
                yield (t, rank, *(table[t, rank] for table in tables))

    return _write(path, ["round", "rank", *fields], rows() if tables else ())


def partition_csv(run: Run, path: Path) -> Path:
    p = run.partition
    hist = p.get("label_histograms", np.zeros((len(p.get("train_sizes", [])), 0), dtype=np.int64))
    columns = [("host_rank", "host_rank"), ("train_size", "train_sizes"), ("test_size", "test_sizes")]
    present = [(title, p[key]) for title, key in columns if key in p]
    header = ["client", *(title for title, _ in present), *(f"label_{c}" for c in range(hist.shape[1]))]
    rows = ((k, *(v[k] for _, v in present), *hist[k]) for k in range(hist.shape[0]))
    return _write(path, header, rows)


def export_csv(path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write every CSV file of the run ``path`` into ``out_dir``; return them."""
    run = load_run(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        rounds_csv(run, out / "rounds.csv"),
        clients_csv(run, out / "clients.csv"),
        comm_csv(run, out / "comm.csv"),
        ranks_csv(run, out / "ranks.csv"),
        partition_csv(run, out / "partition.csv"),
    ]
