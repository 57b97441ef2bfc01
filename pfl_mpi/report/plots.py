"""PNG figures of one or several runs (overlaid: one colour per run), matplotlib's Agg backend."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .load import Run, bytes_by_label, group_labels, server_seconds_by_label  # noqa: E402

DPI = 100
KIND_STYLE = {"down": "-", "up": "--", "other": ":"}
RANK_PARTS = ("compute", "aggregate", "communication", "other")


def _colours(runs: list[Run]) -> list:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(len(runs))]


def _round_axis(ax, runs: list[Run]) -> None:
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.5, max(max(run.rounds_completed for run in runs), 1) + 0.5)
    ax.grid(alpha=0.3)


def _save(fig, path: Path, layout: bool = True) -> Path:
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def accuracy_loss(runs: list[Run], path: Path) -> Path:
    """Test accuracy (personal, the global model's where the algorithm keeps one beside the personal
    ones, and after fine-tuning) and train/test loss against rounds."""
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for run, colour in zip(runs, _colours(runs), strict=True):
        x, r, ev = run.round_numbers, run.rounds, run.evaluated()
        if len(ev):
            acc_ax.plot(x[ev], r["test_acc"][ev], "o-", ms=3, color=colour, label=run.label)
            if "global_test_acc" in r:
                label = f"{run.label} global model"
                acc_ax.plot(x[ev], r["global_test_acc"][ev], "s:", ms=3, color=colour, label=label)
            loss_ax.plot(x[ev], r["test_loss"][ev], "o-", ms=3, color=colour, label=f"{run.label} test")
        ft = r.get("finetune_test_acc")
        if ft is not None and np.any(~np.isnan(ft)):
            done = np.flatnonzero(~np.isnan(ft))
            acc_ax.plot(x[done], ft[done], "*", ms=12, color=colour, label=f"{run.label} after fine-tuning")
        if "train_loss" in r and run.rounds_completed:
            loss_ax.plot(x, r["train_loss"], "--", color=colour, alpha=0.7, label=f"{run.label} train")
    acc_ax.set(
        ylabel="test accuracy (fraction, weighted by test samples)",
        title="Test accuracy (global model: dotted)",
    )
    loss_ax.set(ylabel="loss (nats)", title="Loss: test (solid), train of sampled clients (dashed)")
    for ax in (acc_ax, loss_ax):
        _round_axis(ax, runs)
        ax.legend(fontsize=7)
    return _save(fig, path)


def client_accuracy(runs: list[Run], path: Path) -> Path:
    """Per-client test accuracy: its distribution at the last evaluation, and percentiles over rounds."""
    fig, (hist_ax, band_ax) = plt.subplots(1, 2, figsize=(10, 4))
    bins = np.linspace(0, 1, 21)
    for run, colour in zip(runs, _colours(runs), strict=True):
        acc, ev = run.clients.get("test_acc"), run.evaluated()
        if acc is None or not len(ev):
            continue
        last = acc[ev[-1]]
        last = last[~np.isnan(last)]
        hist_ax.hist(last, bins=bins, histtype="step", lw=2, color=colour, label=f"{run.label}, round {ev[-1] + 1}")
        q = np.nanpercentile(acc[ev].astype(np.float64), [10, 50, 90], axis=1)
        x = run.round_numbers[ev]
        band_ax.fill_between(x, q[0], q[2], color=colour, alpha=0.2, label=f"{run.label} 10-90th percentile")
        band_ax.plot(x, q[1], "o-", ms=3, color=colour, label=f"{run.label} median")
    hist_ax.set(
        xlabel="client test accuracy (fraction)",
        ylabel="clients",
        title="Per-client accuracy at the last evaluation",
        xlim=(0, 1),
    )
    hist_ax.grid(alpha=0.3)
    band_ax.set(ylabel="client test accuracy (fraction)", title="Per-client accuracy over rounds", ylim=(0, 1.02))
    _round_axis(band_ax, runs)
    for ax in (hist_ax, band_ax):
        ax.legend(fontsize=7)
    return _save(fig, path)


def _byte_unit(peak: float) -> tuple[float, str]:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if peak >= scale:
            return scale, unit
    return 1.0, "B"


def communication(runs: list[Run], path: Path) -> Path:
    """Bytes and rank 0's seconds in collectives per round, split into down, up and other messages."""
    fig, (bytes_ax, sec_ax) = plt.subplots(1, 2, figsize=(10, 4))
    moved = [group_labels(run, bytes_by_label(run)) for run in runs]
    scale, unit = _byte_unit(max((float(v.max()) for g in moved for v in g.values() if v.size), default=0.0))
    for run, colour, groups in zip(runs, _colours(runs), moved, strict=True):
        seconds = group_labels(run, server_seconds_by_label(run))
        for kind, style in KIND_STYLE.items():
            label = f"{run.label} {kind}"
            bytes_ax.plot(run.round_numbers, groups[kind] / scale, style, color=colour, label=label)
            sec_ax.plot(run.round_numbers, seconds[kind], style, color=colour, label=label)
    bytes_ax.set(ylabel=f"payload per round ({unit})", title="Bytes per round: down, up (algorithm), other")
    sec_ax.set(ylabel="seconds per round (rank 0)", title="Rank 0's time in collectives, waiting included")
    for ax in (bytes_ax, sec_ax):
        _round_axis(ax, runs)
        ax.set_ylim(bottom=0)
    handles, labels = bytes_ax.get_legend_handles_labels()
    order = [i * len(KIND_STYLE) + k for k in range(len(KIND_STYLE)) for i in range(len(runs))]  # a row per run
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="lower center", ncols=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.03 + 0.045 * len(runs), 1, 1))
    return _save(fig, path, layout=False)


def rank_breakdown(run: Run) -> dict[str, np.ndarray]:
    """Mean seconds per round on each rank: compute, aggregate, communication, other (the rest of its wall time)."""
    ranks = run.ranks
    parts = {
        "compute": np.nanmean(ranks["compute_seconds"], axis=0),
        "aggregate": np.nanmean(ranks["aggregate_seconds"], axis=0),
        "communication": run.comm["seconds"].sum(axis=2).mean(axis=0),
    }
    wall = np.nanmean(ranks["wall_seconds"], axis=0)
    parts["other"] = np.maximum(wall - sum(parts.values()), 0.0)
    return parts


def ranks(runs: list[Run], path: Path) -> Path:
    """One horizontal stacked bar per rank and run: where a round's time goes."""
    runs = [run for run in runs if run.ranks and run.rounds_completed]
    height = 1.4 + 0.4 * sum(run.ranks["wall_seconds"].shape[1] for run in runs) + 0.6 * len(runs)
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, height), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, run in zip(axes[:, 0], runs, strict=True):
        parts = rank_breakdown(run)
        size = len(parts["compute"])
        y = np.arange(size)
        left = np.zeros(size)
        for i, name in enumerate(RANK_PARTS):
            ax.barh(y, parts[name], left=left, color=colours[i], label=name)
            left += np.nan_to_num(parts[name])
        ax.set_yticks(y, ["0 (server)", *[str(r) for r in range(1, size)]])
        ax.invert_yaxis()
        ax.set(ylabel="rank", title=f"{run.label}: mean time per round on each rank ({run.rounds_completed} rounds)")
        ax.grid(alpha=0.3, axis="x")
    axes[-1, 0].set_xlabel("seconds per round (mean over the rounds)")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", ncols=len(RANK_PARTS), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    return _save(fig, path, layout=False)
