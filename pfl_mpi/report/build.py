"""``make_report``: every figure and report.md for one or several run files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from . import plots
from .load import Run, load_run
from .tables import comparison_table, label_table

FIGURES = (
    ("accuracy_loss.png", plots.accuracy_loss, "Test accuracy and loss"),
    ("client_accuracy.png", plots.client_accuracy, "Per-client accuracy"),
    ("communication.png", plots.communication, "Bytes and seconds per round by message kind"),
    ("ranks.png", plots.ranks, "Time per round on each rank"),
)


def _name_runs(runs: list[Run]) -> None:
    """Legend entries: run name and algorithm, with the file name added where those repeat."""
    counts = Counter(run.label for run in runs)
    for run in runs:
        if counts[run.label] > 1:
            run.legend = f"{run.path.stem}: {run.label}"


def make_report(paths: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Write the figures and report.md for ``paths`` into ``out_dir``; return the files written."""
    runs = [load_run(p) for p in paths]
    _name_runs(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, sections = [], []
    for file, draw, title in FIGURES:
        if file == "ranks.png" and not any(run.ranks and run.rounds_completed for run in runs):
            continue
        written.append(draw(runs, out / file))
        sections.append(f"### {title}\n![{title}]({file})\n")
    text = [
        "# Run report\n",
        "Runs: " + ", ".join(f"`{run.path}` ({run.label})" for run in runs) + "\n",
        "## Comparison\n",
        comparison_table(runs) + "\n",
        "Accuracies are `/rounds/test_acc` (the model each client uses, weighted by test samples) at the "
        "last and the best evaluated round (1-based); client mean is `/rounds/test_acc_mean` at the last "
        "evaluation. Bytes are sums over the committed rounds of `bytes_down + bytes_up` (the algorithm) "
        "and of all three with `bytes_other`; wall time is the sum of `/rounds/seconds_wall`.\n",
        "## Figures\n",
        *sections,
        "## Messages by label\n",
        "Totals over the run. Bytes as /rounds counts them (down: received by the workers; up: sent "
        "by the workers; others: sent by every rank); seconds are rank 0's, waiting included.\n",
    ]
    for run in runs:
        text += [f"### {run.label}\n", label_table(run) + "\n"]
    report = out / "report.md"
    report.write_text("\n".join(text))
    return [*written, report]
