"""Plots and a markdown report of run files, grouped: runs that differ only in seed are one group.

Writes into DIR: accuracy_loss.png, cost.png (accuracy against cumulative protocol bytes and simulated
time), comparison.png, client_accuracy.png, communication.png, ranks.png, report.md (group table with
mean ± std and n, the communication cost table, configuration differences, per-run table, message totals),
groups.csv and cost.csv. Prints the group table, the cost table (with ``--target-acc A``: the round,
protocol bytes and simulated time at which each group first reached test accuracy A), the configuration
keys that differ between groups, and a warning when more than the compared key differs. See docs/reports.md.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError

NAME = "report"
HELP = "plots and tables of run files, runs differing only in seed grouped (mean ± std)"
EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="RUN.h5", help="run files (several: grouped and compared)")
    parser.add_argument("-o", "--out", required=True, metavar="DIR", help="directory for the PNGs and report.md")
    parser.add_argument(
        "--group-by",
        action="append",
        default=[],
        metavar="KEY",
        help="also average over this config key, as over seed (repeatable), e.g. data.mnist1d.seed",
    )
    parser.add_argument(
        "--by",
        action="append",
        default=[],
        metavar="KEY",
        help="the compared config key, named in the legends (repeatable; default: the one key that differs)",
    )
    parser.add_argument(
        "--target-acc",
        type=float,
        default=None,
        metavar="A",
        help="test accuracy (fraction) whose cost the table gives: the round, protocol bytes down and up and "
        "simulated time at which each run first reached it",
    )


def print_summary(report) -> None:
    """The group table, the differing config keys and the fairness warning (stderr)."""
    from ..report.build import difference_lines

    print(report.tables[0])
    print("communication cost (protocol bytes over the run; simulated time where the network was simulated):")
    print(report.tables[1])
    lines = difference_lines(report.groups, report.differences)
    if lines:
        print("config keys that differ between groups:")
        for line in lines:
            print(f"  {line}")
    if report.warning:
        print(f"pfl-mpi: warning: {report.warning}", file=sys.stderr)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..report import make_report

    try:
        report = make_report(args.files, args.out, args.group_by, args.by, args.target_acc)
    except ConfigError as err:
        print(f"pfl-mpi: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError, KeyError) as err:
        print(f"pfl-mpi: cannot report on {' '.join(args.files)}: {err}", file=sys.stderr)
        return 1
    print_summary(report)
    for path in report.files:
        print(f"wrote {path}")
    return 0
