"""Plots (PNG) and a markdown report of one or several run files; several runs are overlaid and compared.

Writes into DIR: accuracy_loss.png, client_accuracy.png, communication.png, ranks.png and
report.md (comparison table, message totals by label, the figures). See docs/reports.md.
"""

from __future__ import annotations

import argparse
import sys

NAME = "report"
HELP = "plots and a comparison table (report.md) of run files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="RUN.h5", help="run files (several: overlaid and compared)")
    parser.add_argument("-o", "--out", required=True, metavar="DIR", help="directory for the PNGs and report.md")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..report import make_report

    try:
        written = make_report(args.files, args.out)
    except (OSError, ValueError, KeyError) as err:
        print(f"pfl-mpi: cannot report on {' '.join(args.files)}: {err}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0
