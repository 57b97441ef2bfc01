"""Export a run file's committed rounds as CSV files (no pandas needed to read them back).

Writes into DIR: rounds.csv, clients.csv (long format: round, client, one column per metric),
comm.csv (round, rank, label, counters), ranks.csv and partition.csv. See docs/reports.md.
"""

from __future__ import annotations

import argparse
import sys

NAME = "export"
HELP = "write a run file's metrics as CSV files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="RUN.h5", help="HDF5 run file")
    parser.add_argument("--csv", required=True, metavar="DIR", help="directory for the CSV files")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..report import export_csv

    try:
        written = export_csv(args.file, args.csv)
    except (OSError, ValueError, KeyError) as err:
        print(f"pfl-mpi: cannot export {args.file}: {err}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0
