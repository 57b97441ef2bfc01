"""``make_report``: every figure, report.md and groups.csv for one or several run files, grouped by config."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ..errors import ConfigError
from . import plots
from .cost import NO_NETWORK, cost_table, write_cost_csv
from .groups import Group, differences, fairness, group_runs, known_keys, name_groups, shown
from .load import Run, load_run
from .tables import comparison_table, group_table, has_validation, label_table, write_group_csv

FIGURES = (
    ("accuracy_loss.png", plots.accuracy_loss, "Test accuracy and loss"),
    ("cost.png", plots.cost, "Accuracy against protocol bytes and simulated time"),
    ("comparison.png", plots.comparison, "Final accuracy and bytes per round by group"),
    ("client_accuracy.png", plots.client_accuracy, "Per-client accuracy"),
    ("communication.png", plots.communication, "Bytes and seconds per round by message kind"),
    ("ranks.png", plots.ranks, "Time per round on each rank"),
)
COST_NOTE = (
    "Protocol bytes are what the clients would download and upload in a deployment (`/rounds/protocol_bytes_down`, "
    "`_up`; evaluation traffic apart), summed over the committed rounds, the same on any number of ranks. Simulated "
    "time is the simulated network's clock (`/rounds/simulated_time`); runs without `network.enabled` have none "
    f"({NO_NETWORK!r}). Per run at full precision: `cost.csv`."
)
TARGET_NOTE = (
    " The last four columns: the first evaluated round (1-based) at which `/rounds/test_acc` was at least {target:g}, "
    "and the cumulative protocol bytes and simulated time at its end, mean ± std over the runs that reached it "
    "(how many did, when not all)."
)
LABEL_TABLES_MAX = 12  # message tables of at most this many runs (one per group beyond)


@dataclass
class Report:
    """What ``make_report`` wrote and found."""

    files: list[Path]
    groups: list[Group]
    differences: dict[str, list[str]]  # config key -> its value in each group
    warning: str | None = None
    tables: list[str] = field(default_factory=list)  # the group table, then the cost table


VAL_NOTE = (
    "Runs with a validation split (`data.eval_on: [val, test]`): final and best val acc are `/rounds/val_acc` at the "
    "last and the best evaluated round, and test acc at best val is `/rounds/test_acc` of that round (the "
    "selection on validation, reported on test).\n"
)


def _name_runs(runs: list[Run]) -> None:
    """Run labels: run name and algorithm, with the file name added where those repeat."""
    counts = Counter(run.label for run in runs)
    for run in runs:
        if counts[run.label] > 1:
            run.legend = f"{run.path.stem}: {run.label}"


def check_keys(runs: list[Run], group_by: list[str], by: list[str]) -> None:
    """Raise ConfigError naming an option whose key no run's configuration has."""
    known = known_keys(runs)
    if not known:
        return
    for option, keys in (("--group-by", group_by), ("--by", by)):
        for key in keys:
            if key not in known:
                raise ConfigError(option, f"no run has a config key {key!r}")


def difference_lines(groups: list[Group], diffs: dict[str, list[str]]) -> list[str]:
    """One line per config key that differs between groups: its value in each group."""
    return [
        f"{key}: " + ", ".join(f"{g.legend}: {shown(v)}" for g, v in zip(groups, values, strict=True))
        for key, values in diffs.items()
    ]


def fairness_warning(diffs: dict[str, list[str]], by: list[str]) -> str | None:
    """The warning when the groups differ in more than the compared key, else None."""
    compared, extra = fairness(diffs, by)
    if not extra:
        return None
    if compared or by:
        what = ", ".join(compared or by)
        return (
            f"the groups differ in more than {what}: also {', '.join(extra)}; "
            "compare like with like (one config, one key changed: pfl-mpi sweep --set-grid)"
        )
    return (
        f"the groups differ in {len(extra)} config keys: {', '.join(extra)}; a fair comparison changes one "
        "(name it with --by KEY; pfl-mpi sweep --set-grid KEY=... runs such a grid)"
    )


def check_target(target: float | None) -> None:
    """Raise ConfigError unless ``target`` is None or an accuracy in (0, 1]."""
    if target is not None and not 0 < target <= 1:
        raise ConfigError("--target-acc", f"a test accuracy is a fraction in (0, 1], got {target:g}")


def make_report(
    paths: list[str | Path],
    out_dir: str | Path,
    group_by: list[str] = (),
    by: list[str] = (),
    target: float | None = None,
) -> Report:
    """Write the figures, report.md, groups.csv and cost.csv for ``paths`` into ``out_dir``; ``target``: the
    test accuracy whose cost (round, protocol bytes, simulated time) the cost table gives."""
    check_target(target)
    runs = [load_run(p) for p in paths]
    check_keys(runs, list(group_by), list(by))
    _name_runs(runs)
    groups = group_runs(runs, list(group_by))
    diffs = differences(groups)
    name_groups(groups, list(by), diffs)
    warning = fairness_warning(diffs, list(by))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, sections = [], []
    for file, draw, title in FIGURES:
        if file == "ranks.png" and not any(run.ranks and run.rounds_completed for run in runs):
            continue
        draw = partial(draw, target=target) if draw is plots.cost else draw
        written.append(draw(groups, out / file))
        sections.append(f"### {title}\n![{title}]({file})\n")
    written.append(write_group_csv(groups, out / "groups.csv"))
    written.append(write_cost_csv(groups, out / "cost.csv", target))
    grouped, costs = group_table(groups), cost_table(groups, target)
    text = [
        "# Run report\n",
        f"{len(runs)} run(s) in {len(groups)} group(s): runs whose configurations differ only in "
        + ", ".join(["seed", *group_by])
        + " form a group.\n",
        "## Groups\n",
        grouped + "\n",
        "Each cell is the mean ± the sample standard deviation (ddof=1) over the group's runs (n; one run: "
        "its value). Accuracies are `/rounds/test_acc` (the model each client uses, weighted by test "
        "samples) at the last and the best evaluated round; client mean is `/rounds/test_acc_mean` at the "
        "last evaluation. Bytes are sums over the committed rounds of `bytes_down + bytes_up` (the algorithm) "
        "and of all three with `bytes_other`; wall time is the sum of `/rounds/seconds_wall`. The same "
        "numbers at full precision: `groups.csv`.\n" + (VAL_NOTE if has_validation(runs) else ""),
        "## Communication cost\n",
        costs + "\n",
        COST_NOTE + (TARGET_NOTE.format(target=target) if target is not None else "") + "\n",
        "## Configuration differences between groups\n",
    ]
    lines = difference_lines(groups, diffs)
    text.append("\n".join(f"- `{line}`" for line in lines) + "\n" if lines else "None: one configuration.\n")
    if warning:
        text.append(f"**Warning:** {warning}.\n")
    text += [
        "## Runs\n",
        comparison_table(runs) + "\n",
        "## Figures\n",
        *sections,
        "## Messages by label\n",
        "Totals over the run. Bytes as /rounds counts them (down: received by the workers; up: sent "
        "by the workers; others: sent by every rank); seconds are rank 0's, waiting included.\n",
    ]
    shown_runs = runs if len(runs) <= LABEL_TABLES_MAX else [g.runs[0] for g in groups]
    for run in shown_runs:
        if run.comm:
            text += [f"### {run.label}\n", label_table(run) + "\n"]
    report = out / "report.md"
    report.write_text("\n".join(text))
    return Report([*written, report], groups, diffs, warning, [grouped, costs])
