"""PNG figures of groups of runs (matplotlib's Agg backend): one colour per group, its mean over the
group's runs as the line and +- one sample standard deviation as a band. A group of one run is a
plain line. Legends sit below the axes, colours (groups) apart from line styles (quantities)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from .cost import NO_NETWORK, cumulative  # noqa: E402
from .groups import Group, series  # noqa: E402
from .load import Run, bytes_by_label, group_labels, server_seconds_by_label  # noqa: E402
from .tables import group_statistics, protocol_fields  # noqa: E402

DPI = 100
KIND_STYLE = {"down": "-", "up": "--", "other": ":"}
RANK_PARTS = ("compute", "aggregate", "communication", "other")
BAND_ALPHA = 0.2


def _colours(groups: list[Group]) -> list:
    if len(groups) <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(len(groups))]
    cmap = plt.get_cmap("tab20" if len(groups) <= 20 else "turbo")
    return [cmap(i / max(len(groups) - 1, 1)) if len(groups) > 20 else cmap(i) for i in range(len(groups))]


def _rounds_of(groups: list[Group]) -> int:
    return max((run.rounds_completed for g in groups for run in g.runs), default=1)


def _round_axis(ax, groups: list[Group]) -> None:
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.5, max(_rounds_of(groups), 1) + 0.5)
    ax.grid(alpha=0.3)


def _legend_below(fig, groups: list[Group], colours: list, styles: list[tuple[str, dict]] = ()) -> None:
    """One legend under the axes: a colour patch per group, then the line styles; the axes shrink to make room."""
    handles = [Line2D([], [], color=c, lw=3) for c in colours]
    labels = [g.legend for g in groups]
    for text, style in styles:
        handles.append(Line2D([], [], color="0.3", **style))
        labels.append(text)
    ncols = min(4, max(1, len(labels)))
    rows = -(-len(labels) // ncols)
    fig.legend(handles, labels, loc="lower center", ncols=ncols, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, min(0.5, (0.3 + 0.22 * rows) / fig.get_figheight()), 1, 1))


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _band(ax, x: np.ndarray, values: list[np.ndarray], colour, style: str = "o-", band: bool = True) -> None:
    """Mean over runs of ``values`` (one [R] array each) where any run has a value, and the std band."""
    mean, std, count = series(values)
    keep = count > 0
    if not keep.any():
        return
    xs = x[: len(mean)][keep]
    ax.plot(xs, mean[keep], style, ms=3, color=colour)
    if band and np.any(count[keep] > 1):
        ax.fill_between(xs, (mean - std)[keep], (mean + std)[keep], color=colour, alpha=BAND_ALPHA, lw=0)


def _x(groups: list[Group]) -> np.ndarray:
    return np.arange(1, _rounds_of(groups) + 1)


def _metric(run: Run, name: str) -> np.ndarray:
    return run.rounds.get(name, np.full(run.rounds_completed, np.nan)).astype(np.float64)


def accuracy_loss(groups: list[Group], path: Path) -> Path:
    """Test accuracy (and the global model's, after fine-tuning, of the served novel clients) and train/test loss
    against rounds."""
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4.6))
    x, colours = _x(groups), _colours(groups)
    styles = [("test accuracy / test loss", {"ls": "-", "marker": "o", "ms": 3})]
    for group, colour in zip(groups, colours, strict=True):
        runs = group.runs
        score, loss = runs[0].score, runs[0].loss_metric  # the task's: test_acc/test_loss, test_rmse/test_mse
        _band(acc_ax, x, [_metric(r, score) for r in runs], colour)
        if any(f"global_{score}" in r.rounds for r in runs):
            _band(acc_ax, x, [_metric(r, f"global_{score}") for r in runs], colour, "s:", band=False)
            styles.append(("global model accuracy", {"ls": ":", "marker": "s", "ms": 3}))
        _band(loss_ax, x, [_metric(r, loss) for r in runs], colour)
        _band(loss_ax, x, [_metric(r, "train_loss") for r in runs], colour, "--", band=False)
        marks = ((f"finetune_{score}", "*", "after fine-tuning"), (f"novel_{score}", "D", "novel clients, served"))
        for name, marker, label in marks:
            mean, std, count = series([_metric(r, name) for r in runs])
            if np.any(count > 0):
                i = int(np.flatnonzero(count > 0)[-1])
                ms = 12 if marker == "*" else 7
                acc_ax.errorbar(x[i], mean[i], yerr=0 if count[i] < 2 else std[i], fmt=marker, ms=ms, color=colour)
                styles.append((label, {"ls": "", "marker": marker, "ms": ms - 2}))
    styles.append(("train loss of the sampled clients", {"ls": "--"}))
    acc_ax.set(ylabel="test accuracy (fraction, weighted by test samples)", title="Test accuracy")
    if all(r.score == "test_rmse" for g in groups for r in g.runs):  # task regression
        acc_ax.set(ylabel="test RMSE (root of the MSE weighted by test samples)", title="Test RMSE")
    loss_ax.set(ylabel="loss (nats)", title="Loss: test (solid), train (dashed)")
    for ax in (acc_ax, loss_ax):
        _round_axis(ax, groups)
    band = any(g.n > 1 for g in groups)
    if band:
        acc_ax.set_title("Test accuracy: mean over seeds, band ± 1 std")
    _legend_below(fig, groups, colours, list(dict(styles).items()))
    return _save(fig, path)


def client_accuracy(groups: list[Group], path: Path) -> Path:
    """Per-client test accuracy: its distribution at the last evaluation (the group's runs pooled), and
    the clients' median and 10-90th percentiles over rounds (mean over the group's runs)."""
    fig, (hist_ax, band_ax) = plt.subplots(1, 2, figsize=(10, 4.6))
    bins = np.linspace(0, 1, 21)
    x, colours = _x(groups), _colours(groups)
    for group, colour in zip(groups, colours, strict=True):
        last, quantiles = [], []
        for run in group.runs:
            acc, ev = run.clients.get(run.score), run.evaluated()
            if acc is None or not len(ev):
                continue
            final = acc[ev[-1]]
            last.append(final[~np.isnan(final)])
            q = np.full((3, run.rounds_completed), np.nan)
            q[:, ev] = np.nanpercentile(acc[ev].astype(np.float64), [10, 50, 90], axis=1)
            quantiles.append(q)
        if not last:
            continue
        pooled = np.concatenate(last)
        weights = np.full(len(pooled), 1 / max(len(pooled), 1))
        hist_ax.hist(pooled, bins=bins, weights=weights, histtype="step", lw=2, color=colour)
        low, mid, high = (series([q[i] for q in quantiles])[0] for i in range(3))
        keep = ~np.isnan(mid)
        xs = x[: len(mid)][keep]
        band_ax.fill_between(xs, low[keep], high[keep], color=colour, alpha=BAND_ALPHA, lw=0)
        band_ax.plot(xs, mid[keep], "o-", ms=3, color=colour)
    hist_ax.set(
        xlabel="client test accuracy (fraction)",
        ylabel="fraction of clients",
        title="Per-client accuracy at the last evaluation",
        xlim=(0, 1),
    )
    hist_ax.grid(alpha=0.3)
    band_ax.set(
        ylabel="client test accuracy (fraction)", title="Clients' median, 10-90th percentile band", ylim=(0, 1.02)
    )
    _round_axis(band_ax, groups)
    _legend_below(fig, groups, colours)
    return _save(fig, path)


def _byte_unit(peak: float) -> tuple[float, str]:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if peak >= scale:
            return scale, unit
    return 1.0, "B"


def communication(groups: list[Group], path: Path) -> Path:
    """Bytes and rank 0's seconds in collectives per round, split into down, up and other messages
    (mean over each group's runs)."""
    fig, (bytes_ax, sec_ax) = plt.subplots(1, 2, figsize=(10, 4.6))
    x, colours = _x(groups), _colours(groups)
    moved = [[group_labels(run, bytes_by_label(run)) for run in g.runs] for g in groups]
    peak = max((float(v.max()) for runs in moved for g in runs for v in g.values() if v.size), default=0.0)
    scale, unit = _byte_unit(peak)
    for group, colour, by_run in zip(groups, colours, moved, strict=True):
        seconds = [group_labels(run, server_seconds_by_label(run)) for run in group.runs]
        for kind, style in KIND_STYLE.items():
            _band(bytes_ax, x, [b[kind] / scale for b in by_run], colour, style, band=False)
            _band(sec_ax, x, [s[kind] for s in seconds], colour, style, band=False)
    bytes_ax.set(ylabel=f"payload per round ({unit})", title="Bytes per round: down, up (algorithm), other")
    sec_ax.set(ylabel="seconds per round (rank 0)", title="Rank 0's time in collectives, waiting included")
    for ax in (bytes_ax, sec_ax):
        _round_axis(ax, groups)
        ax.set_ylim(bottom=0)
    _legend_below(fig, groups, colours, [(f"{k} messages", {"ls": s}) for k, s in KIND_STYLE.items()])
    return _save(fig, path)


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


def _with_ranks(group: Group) -> list[Run]:
    """The group's runs with rank records, of its most common world size."""
    runs = [run for run in group.runs if run.ranks and run.rounds_completed]
    if not runs:
        return []
    sizes = [run.ranks["wall_seconds"].shape[1] for run in runs]
    common = max(set(sizes), key=sizes.count)
    return [run for run, size in zip(runs, sizes, strict=True) if size == common]


def ranks(groups: list[Group], path: Path) -> Path:
    """Per group, one horizontal stacked bar per rank: where a round's time goes (mean over its runs)."""
    shown = [(g, _with_ranks(g)) for g in groups]
    shown = [(g, runs) for g, runs in shown if runs]
    cols = 1 if len(shown) <= 3 else 2
    rows = -(-len(shown) // cols)
    size = max(runs[0].ranks["wall_seconds"].shape[1] for _, runs in shown)
    height = 1.2 + rows * (0.9 + 0.3 * size)
    fig, axes = plt.subplots(rows, cols, figsize=(10, height), squeeze=False, sharex=True)  # one time scale
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax in axes.flat[len(shown) :]:
        ax.set_visible(False)
    for ax, (group, runs) in zip(axes.flat, shown, strict=False):  # the grid may have a spare cell
        parts = {name: np.mean([rank_breakdown(run)[name] for run in runs], axis=0) for name in RANK_PARTS}
        p = len(parts["compute"])
        y, left = np.arange(p), np.zeros(p)
        for i, name in enumerate(RANK_PARTS):
            ax.barh(y, parts[name], left=left, color=colours[i], label=name)
            left += np.nan_to_num(parts[name])
        ax.set_yticks(y, ["0 (server)", *[str(r) for r in range(1, p)]])
        ax.invert_yaxis()
        runs_text = f"{len(runs)} runs" if len(runs) > 1 else f"{runs[0].rounds_completed} rounds"
        ax.set_title(f"{group.legend}: {runs_text}", fontsize=9)
        ax.set_ylabel("rank")
        ax.grid(alpha=0.3, axis="x")
    for ax in axes[-1, :]:
        ax.set_xlabel("seconds per round (mean over rounds and runs)")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", ncols=len(RANK_PARTS), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    return _save(fig, path)


def comparison(groups: list[Group], path: Path) -> Path:
    """Left: final test accuracy per group, each run a dot, mean +- sample std as a bar with whiskers.
    Right: mean bytes per round of every byte field of /rounds (bytes_*, protocol_bytes_* when present)."""
    stats = group_statistics(groups)
    colours = _colours(groups)
    height = 1.6 + 0.45 * len(groups)
    fig, (acc_ax, bytes_ax) = plt.subplots(1, 2, figsize=(10, max(height, 3.2)), sharey=True)
    y = np.arange(len(groups))
    for i, (group, stat, colour) in enumerate(zip(groups, stats, colours, strict=True)):
        mean, std, n = stat["final_acc"]
        if n:
            acc_ax.barh(i, mean, color=colour, alpha=0.35, height=0.6)
            acc_ax.errorbar(mean, i, xerr=std if n > 1 else None, fmt="none", ecolor="black", capsize=4)
        finals = []
        for run in group.runs:
            ev = run.evaluated()
            finals.append(run.rounds[run.score][ev[-1]] if len(ev) else np.nan)
        jitter = np.linspace(-0.15, 0.15, len(finals)) if len(finals) > 1 else [0.0]
        acc_ax.plot(finals, i + np.asarray(jitter), "o", ms=4, color=colour, markeredgecolor="black", mew=0.5)
    acc_ax.set_yticks(y, [g.legend for g in groups], fontsize=8)
    acc_ax.invert_yaxis()
    acc_ax.set(xlabel="final test accuracy (fraction)", title="Final test accuracy: runs (dots), mean ± 1 std")
    acc_ax.grid(alpha=0.3, axis="x")
    fields = byte_fields([run for g in groups for run in g.runs])
    per_group = [
        {f: np.nanmean([np.nanmean(_metric(run, f)) for run in g.runs if f in run.rounds] or [np.nan]) for f in fields}
        for g in groups
    ]
    peak = max((v for d in per_group for v in d.values() if np.isfinite(v)), default=0.0)
    scale, unit = _byte_unit(peak)
    width = 0.8 / max(len(fields), 1)
    cmap = plt.get_cmap("Set2")
    for j, name in enumerate(fields):
        values = [d[name] / scale for d in per_group]
        bytes_ax.barh(y - 0.4 + width * (j + 0.5), values, height=width, color=cmap(j % 8), label=name)
    if not peak:
        bytes_ax.text(0.5, 0.5, "no bytes moved (one process)", ha="center", va="center", transform=bytes_ax.transAxes)
        bytes_ax.set_xlim(0, 1)
    bytes_ax.set(xlabel=f"mean per round ({unit})", title="Bytes per round by field of /rounds")
    bytes_ax.grid(alpha=0.3, axis="x")
    if fields and peak:
        bytes_ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def byte_fields(runs: list[Run]) -> list[str]:
    """Every byte count of /rounds in the runs: the protocol's (protocol_bytes_*) first, what a deployment would
    pay, then the simulation's transport (bytes_down, bytes_up, bytes_other)."""
    names = {name for run in runs for name in run.rounds if name.startswith("bytes_")}
    transport = [n for n in ("bytes_down", "bytes_up", "bytes_other") if n in names]
    protocol = sorted({name for run in runs for name in protocol_fields(run)})
    return protocol + transport + sorted(names - set(transport))


COST_PANELS = (  # (Cost attribute, x label, title)
    ("total", "cumulative protocol bytes, down + up", "Accuracy against bytes down + up"),
    ("up", "cumulative protocol bytes up (client to server)", "Accuracy against uplink bytes"),
    ("down", "cumulative protocol bytes down (server to client)", "Accuracy against downlink bytes"),
    ("seconds", "cumulative simulated time (s)", "Accuracy against simulated time"),
)


def _cost_curve(ax, runs: list[Run], what: str, colour) -> bool:
    """The group's test accuracy against its mean cumulative ``what`` per round (band: +- 1 std of the
    accuracy over its runs); False when none of its runs records ``what``."""
    xs, accs = [], []
    for run in runs:
        x = getattr(cumulative(run), what)
        if x is not None:
            xs.append(x)
            accs.append(_metric(run, run.score))
    if not xs:
        return False
    x_mean = series(xs)[0]
    mean, std, count = series(accs)
    keep = (count > 0) & np.isfinite(x_mean)
    if what != "seconds":
        keep &= x_mean > 0  # log axis
    ax.plot(x_mean[keep], mean[keep], "o-", ms=3, color=colour)
    if np.any(count[keep] > 1):
        ax.fill_between(x_mean[keep], (mean - std)[keep], (mean + std)[keep], color=colour, alpha=BAND_ALPHA, lw=0)
    return True


def cost(groups: list[Group], path: Path, target: float | None = None) -> Path:
    """Test accuracy against what the runs paid for it: cumulative protocol bytes (down + up, up, down; log
    axes) and cumulative simulated time. A group is its mean per round over its runs (x and accuracy) with a
    +- one std band of the accuracy. Runs without the simulated network have no simulated time: the time
    panel names them instead of drawing zeros."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 8.4))
    colours = _colours(groups)
    missing: dict[str, list[str]] = {what: [] for what, _, _ in COST_PANELS}
    for group, colour in zip(groups, colours, strict=True):
        for ax, (what, _, _) in zip(axes.flat, COST_PANELS, strict=True):
            if not _cost_curve(ax, group.runs, what, colour):
                missing[what].append(group.legend)
    for ax, (what, xlabel, title) in zip(axes.flat, COST_PANELS, strict=True):
        ax.set(xlabel=xlabel, ylabel="test accuracy (fraction)", title=title)
        ax.grid(alpha=0.3, which="both" if what != "seconds" else "major")
        drawn = len(missing[what]) < len(groups)
        if drawn and what != "seconds":
            ax.set_xscale("log")
            low, high = ax.get_xlim()
            if high < 100 * low:  # under two decades: label 1 and 3 of each, else decades only
                ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 3.0)))
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide
        if drawn and target is not None:
            ax.axhline(target, color="0.35", ls=":", lw=1.2)
        if missing[what]:
            reason = NO_NETWORK if what == "seconds" else "no protocol ledger in the file"
            names = ", ".join(missing[what]) if len(missing[what]) <= 4 else f"{len(missing[what])} groups"
            text = f"{reason}: {names}" if drawn else f"{reason} in these runs:\nnothing to draw"
            ax.text(
                0.5,
                0.03 if drawn else 0.5,
                text,
                ha="center",
                va="bottom" if drawn else "center",
                transform=ax.transAxes,
                fontsize=8,
                wrap=True,
            )
            if not drawn:
                ax.set_xticks([])
                ax.set_yticks([])
    styles = [("target accuracy", {"ls": ":"})] if target is not None else []
    if any(g.n > 1 for g in groups):
        styles.append(("mean over seeds, band +- 1 std", {"ls": "-", "marker": "o", "ms": 3}))
    _legend_below(fig, groups, colours, styles)
    return _save(fig, path)
