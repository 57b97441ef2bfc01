"""Reports from run files: plots, comparison tables, CSV export, following a running job.

``cost.py`` computes what runs paid for their accuracy (protocol bytes, simulated time);
``load.py`` reads a run file once into plain arrays; ``groups.py`` groups runs that differ only in
seed; ``plots.py`` and ``tables.py`` turn groups into PNG figures and markdown tables
(``make_report``); ``export.py`` writes CSV files, ``tensorboard.py`` TensorBoard event files;
``watch.py`` follows a running job's file. Nothing here imports torch or MPI.
"""

from .export import export_csv
from .load import Run, load_run
from .watch import watch

__all__ = ["Run", "export_csv", "load_run", "make_report", "watch"]


def make_report(paths, out_dir, group_by=(), by=(), target=None):
    """Plots, report.md, groups.csv and cost.csv for the run files ``paths`` in ``out_dir`` (``build.Report``);
    ``target``: a test accuracy whose cost the cost table gives."""
    from .build import make_report as _make

    return _make(paths, out_dir, group_by, by, target)
