"""``python -m pfl_mpi`` is the ``pfl-mpi`` command.

``python -m`` puts the working directory first on sys.path, so a stray ``yaml.py`` (or ``torch.py``) where
the user runs the job would be imported by every rank. It is removed before anything else is imported;
plugins are named as files or found beside the config file (``config.import_plugin``).
"""

import os
import sys


def _drop_working_directory() -> None:
    """Remove the entry ``-m`` added (PYTHONPATH entries, even the working directory, stay)."""
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.getcwd():
        del sys.path[0]


_drop_working_directory()

from .cli import main  # noqa: E402 - after the working directory left sys.path

sys.exit(main())
