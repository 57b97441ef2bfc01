"""Follow a running job's file (e.g. from a login node while a SLURM job runs): print each committed round.

Prints the run's own progress line for every new round, polling every --interval seconds; exits
when the file's status is no longer "running": 0 completed, 3 diverged, 1 otherwise (interrupted by
SIGTERM, or a job that died: its file makes no progress while nobody holds its lock); 124 on --timeout.
A file that does not exist yet or cannot be read at a poll is retried at the next.
"""

from __future__ import annotations

import argparse

NAME = "watch"
HELP = "follow a running job's file, one line per committed round"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="RUN.h5", help="HDF5 run file of a running (or finished) job")
    parser.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between polls (default 2)")
    parser.add_argument("--timeout", type=float, default=None, metavar="S", help="give up after S seconds (exit 124)")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..report.watch import watch

    try:
        return watch(args.file, interval=args.interval, timeout=args.timeout)
    except KeyboardInterrupt:
        return 130
