"""Follow a running job's file: print each newly committed round, stop when the run has ended.

Each line is the run's progress line (``runtime/progress.round_line``; with the simulated network it
shows the round's simulated seconds and the simulated clock).
The writer keeps the file open (no SWMR) and flushes after each round, so every poll opens it
afresh, read-only and without the file lock, reads ``rounds_completed`` first and then rows up to it,
and treats a failed or short read as "not yet" (the file may not exist yet, or be caught mid-write);
the next poll retries. A job that died is noticed: status ``interrupted`` (SIGTERM), or a file still
``running`` that makes no progress while nobody holds its lock (``store/lock.py``) on two polls in a row.
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
from ..store.lock import holder
from ..store.reader import _attr, committed_rows, open_run

EXIT_OK, EXIT_FAILED, EXIT_DIVERGED, EXIT_TIMEOUT = 0, 1, 3, 124
IDLE_POLLS = 2  # polls without progress and without a lock holder before a running file is declared dead


def poll(path: str | Path, seen: int) -> tuple[str, int, int, list[dict[str, float]]]:
    """(status, rounds_planned, rounds_completed, metrics of committed rounds seen..done-1)."""
    with open_run(path) as f:
        done = int(f.attrs["rounds_completed"])  # first: every row below it is final
        status = str(_attr(f.attrs["status"]))
        planned = int(f.attrs["rounds_planned"])
        columns = {k: committed_rows(ds, seen, done) for k, ds in f[ROUNDS].items()} if done > seen else {}
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
    seen, last_error, idle = 0, None, 0
    while True:
        try:
            status, planned, done, rows = poll(path, seen)
        except (OSError, KeyError, ValueError, RuntimeError, IndexError, TypeError) as err:  # not there yet, torn
            last_error = err
        else:
            last_error = None
            if done < seen:  # rows dropped by a resume: start over
                seen = 0
                continue
            for metrics in rows:
                print(round_line(planned, metrics), file=out, flush=True)
            idle = idle + 1 if status == "running" and not rows and holder(path) is None else 0
            seen = done
            if status != "running":
                hint = f"; continue it with: pfl-mpi run --resume {path}" if status == "interrupted" else ""
                print(f"{path}: {status}, {done}/{planned} rounds{hint}", file=out, flush=True)
                return {"completed": EXIT_OK, "diverged": EXIT_DIVERGED}.get(status, EXIT_FAILED)
            if idle >= IDLE_POLLS:
                print(
                    f"{path}: no job is writing it (its lock is free) and it made no progress: {done}/{planned} "
                    f"rounds, the job was killed or failed; continue it with: pfl-mpi run --resume {path}",
                    file=out,
                    flush=True,
                )
                return EXIT_FAILED
        if clock() >= deadline:
            reason = f" (last read error: {' '.join(str(last_error).split())})" if last_error else ""
            print(f"pfl-mpi watch: timed out after {timeout} s{reason}", file=sys.stderr, flush=True)
            return EXIT_TIMEOUT
        sleep(max(0.0, min(interval, deadline - clock())))
