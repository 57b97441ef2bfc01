"""``python -m pfl_mpi`` is the ``pfl-mpi`` command."""

import sys

from .cli import main

sys.exit(main())
