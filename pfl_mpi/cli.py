"""The ``pfl-mpi`` command (also ``python -m pfl_mpi``): sub-commands are the modules of ``pfl_mpi.commands``."""

from __future__ import annotations

import argparse
import sys

from .commands import command_modules


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pfl-mpi", description="Personalised federated learning simulated on MPI collectives."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in command_modules():
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.__doc__)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _build_parser().parse_args(argv)
    return args.handler(args, argv)


if __name__ == "__main__":
    sys.exit(main())
