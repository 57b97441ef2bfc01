"""Reports from run files: plots, comparison tables, CSV export, following a running job.

``load.py`` reads a run file once into plain arrays; ``plots.py`` and ``tables.py`` turn runs into
PNG figures and a markdown table (``make_report``); ``export.py`` writes CSV files; ``watch.py``
follows a running job's file. Nothing here imports torch or MPI.
"""

from .export import export_csv
from .load import Run, load_run
from .watch import watch

__all__ = ["Run", "export_csv", "load_run", "make_report", "watch"]


def make_report(paths, out_dir):
    """Plots and report.md for the run files ``paths`` in ``out_dir``; returns the files written."""
    from .build import make_report as _make

    return _make(paths, out_dir)
