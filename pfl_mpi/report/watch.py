"""Follow a running job's file: print each newly committed round, stop when the run has ended.

The writer keeps the file open (no SWMR) and flushes after each round, so every poll opens it
afresh, read-only and without the file lock, and treats a failed read as "not yet" (the file may
not exist yet, or be caught mid-write); the next poll retries.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from ..runtime.progress import round_line
from ..store.layout import ROUNDS
from ..store.reader import _attr, open_run

EXIT_OK, EXIT_FAILED, EXIT_DIVERGED, EXIT_TIMEOUT = 0, 1, 3, 124


def poll(path: str | Path, seen: int) -> tuple[str, int, int, list[dict[str, float]]]:
    """(status, rounds_planned, rounds_completed, metrics of committed rounds seen..done-1)."""
    with open_run(path) as f:
        done = int(f.attrs["rounds_completed"])
        status = str(_attr(f.attrs["status"]))
        planned = int(f.attrs["rounds_planned"])
        columns = {k: ds[seen:done] for k, ds in f[ROUNDS].items()} if done > seen else {}
    rows = [{k: float(v[i]) for k, v in columns.items()} for i in range(max(done - seen, 0))]
    return status, planned, done, rows


def watch(
    path: str | Path,
    interval: float = 2.0,
    timeout: float | None = None,
    out: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Print rounds as they are committed; return 0 (completed), 3 (diverged), 1 (other end) or 124 (timeout)."""
    out = out or sys.stdout
    deadline = math.inf if timeout is None else clock() + timeout
    seen, last_error = 0, None
    while True:
        try:
            status, planned, done, rows = poll(path, seen)
        except (OSError, KeyError, ValueError, RuntimeError) as err:  # not there yet, or caught mid-write
            last_error = err
        else:
            last_error = None
            if done < seen:  # rows dropped by a resume: start over
                seen = 0
                continue
            for metrics in rows:
                print(round_line(planned, metrics), file=out, flush=True)
            seen = done
            if status != "running":
                print(f"{path}: {status}, {done}/{planned} rounds", file=out, flush=True)
                return {"completed": EXIT_OK, "diverged": EXIT_DIVERGED}.get(status, EXIT_FAILED)
        if clock() >= deadline:
            reason = f" (last read error: {last_error})" if last_error else ""
            print(f"pfl-mpi watch: timed out after {timeout} s{reason}", file=sys.stderr, flush=True)
            return EXIT_TIMEOUT
        sleep(max(0.0, min(interval, deadline - clock())))
