"""Errors the user can act on. Each names what is wrong in one line."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid. ``key`` is its dotted path, e.g. ``data.classes_per_client``."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class AgreedConfigError(ConfigError):
    """A ConfigError that every rank raises together (after ``World.agree``), found on rank ``rank``: bad samples
    that only the worker hosting them reads."""

    def __init__(self, key: str, message: str, rank: int):
        super().__init__(key, message)
        self.rank = rank


class DivergenceError(RuntimeError):
    """A loss or an aggregate became NaN or infinite; the completed rounds are kept."""


# exit codes of ``pfl-mpi run`` that the run file's final status follows (``store.run_file.status_of``)
EXIT_CONFIG = 2  # bad input, before the run starts
EXIT_DIVERGED = 3  # NaN or infinite loss or server state
EXIT_WRITE = 4  # the run file could not be written (a full disk); it keeps its committed rounds
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # stopped by Ctrl-C or SIGTERM: committed, status interrupted
INTERRUPT_CODES = (EXIT_SIGINT, EXIT_SIGTERM)


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived before the rounds started; nothing to commit."""

    def __init__(self, signum: int):
        import signal

        super().__init__(f"stopped by {signal.Signals(signum).name} before the first round")
        self.code = 128 + signum
