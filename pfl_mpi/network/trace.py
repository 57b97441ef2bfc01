"""Per-client device traces: a CSV file with one row per device.

Header ``client,down_mbps,up_mbps,latency_ms,speed`` (any column order; other columns are ignored), clients
0..M-1 once each in any order. Bandwidths and speed must be positive, latency non-negative, all finite.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

COLUMNS = ("client", "down_mbps", "up_mbps", "latency_ms", "speed")
ROWS_MAX = 10_000_000


def read_trace(path: str | Path) -> dict[str, np.ndarray]:
    """The trace's columns as float64 arrays in client order (``client`` omitted); ValueError naming the path."""
    path = Path(path).expanduser()
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as err:
        raise ValueError(f"cannot read the trace {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path} is not a CSV text file ({err})") from None
    if not rows:
        raise ValueError(f"{path} has no device rows (header {','.join(COLUMNS)} then one row per client)")
    missing = [c for c in COLUMNS if c not in rows[0]]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {', '.join(missing)} (header {','.join(COLUMNS)})")
    if len(rows) > ROWS_MAX:
        raise ValueError(f"{path} has {len(rows)} rows, more than {ROWS_MAX}")
    values = np.empty((len(rows), len(COLUMNS)), dtype=np.float64)
    for i, row in enumerate(rows):
        for j, name in enumerate(COLUMNS):
            try:
                values[i, j] = float(row[name])
            except (TypeError, ValueError):
                raise ValueError(f"{path}, data row {i + 1}: {name} is {row[name]!r}, not a number") from None
    return _checked(path, values)


def _checked(path: Path, values: np.ndarray) -> dict[str, np.ndarray]:
    ids = values[:, 0]
    if not np.all(ids == np.round(ids)) or sorted(ids.astype(np.int64).tolist()) != list(range(len(ids))):
        raise ValueError(f"{path}: the client column must hold 0..{len(ids) - 1} once each")
    for j, name in enumerate(COLUMNS[1:], start=1):
        column = values[:, j]
        low = 0.0 if name == "latency_ms" else math.ulp(0.0)
        bad = ~np.isfinite(column) | (column < low)
        if bad.any():
            i = int(np.argmax(bad))
            kind = "non-negative" if name == "latency_ms" else "positive"
            raise ValueError(f"{path}, data row {i + 1}: {name} is {column[i]}, it must be finite and {kind}")
    order = np.argsort(ids, kind="stable")
    return {name: values[order, j].copy() for j, name in enumerate(COLUMNS) if name != "client"}
