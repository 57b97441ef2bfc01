"""Export a run file's committed rounds as CSV files and/or TensorBoard event files, and its trained networks.

--csv DIR writes rounds.csv, clients.csv (long format: round, client, one column per metric),
comm.csv (round, rank, label, counters), ranks.csv and partition.csv. --tensorboard DIR writes
DIR/<run>/events.out.tfevents.*: a scalar per /rounds metric and message label per round, and a
histogram of every per-client metric per round (``tensorboard --logdir DIR``). --model DIR writes the last
snapshot's global network and each client's own as PyTorch state_dict files (``pfl_mpi.report.models``). See
docs/reports.md.
"""

from __future__ import annotations

import argparse
import sys

NAME = "export"
HELP = "write a run file's metrics as CSV or TensorBoard files, or its trained networks as state_dicts"
EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="RUN.h5", help="HDF5 run file")
    parser.add_argument("--csv", default=None, metavar="DIR", help="directory for the CSV files")
    parser.add_argument(
        "--tensorboard", default=None, metavar="DIR", help="TensorBoard log directory (event files in DIR/<run>)"
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="directory for the networks of the last state snapshot: global.pt and client_<k>.pt (torch state_dicts)",
    )


def run(args: argparse.Namespace, argv: list[str]) -> int:
    if not (args.csv or args.tensorboard or args.model):
        print("pfl-mpi: export: give --csv DIR, --tensorboard DIR and/or --model DIR", file=sys.stderr)
        return EXIT_USAGE
    written = []
    try:
        if args.csv:
            from ..report import export_csv

            written += export_csv(args.file, args.csv)
        if args.tensorboard:
            try:
                from ..report.tensorboard import export_tensorboard
            except ImportError as err:
                print(
                    f"pfl-mpi: --tensorboard needs the tensorboard package ({err}): pip install tensorboard",
                    file=sys.stderr,
                )
                return EXIT_USAGE
            written.append(export_tensorboard(args.file, args.tensorboard))
        if args.model:
            from ..report.models import export_models

            files, round = export_models(args.file, args.model)
            print(f"networks after round {round + 1}: {len(files)} state_dict files in {args.model}")
    except (OSError, ValueError, KeyError) as err:
        print(f"pfl-mpi: cannot export {args.file}: {err}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0
