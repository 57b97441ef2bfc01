"""The ``pfl-mpi`` command (also ``python -m pfl_mpi``): sub-commands are the modules of ``pfl_mpi.commands``."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .commands import command_modules


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pfl-mpi", description="Personalised federated learning simulated on MPI collectives."
    )
    parser.add_argument("--version", action="version", version=f"pfl-mpi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in command_modules():
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.__doc__)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; a closed pipe (``| head``) or Ctrl-C ends it quietly instead of with a traceback."""
    argv = sys.argv[1:] if argv is None else argv
    args = _build_parser().parse_args(argv)
    try:
        code = args.handler(args, argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        print("pfl-mpi: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def _silence_stdout() -> None:
    """The reader of stdout went away: point stdout at /dev/null so the interpreter's last flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
