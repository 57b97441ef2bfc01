"""The sweep's results: markdown tables, the HDF5 result file and the log-log plot."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .fit import AlphaBeta, Interpolated, fit_alpha_beta

BUFFER_VS_PICKLED = (("Bcast", "pickled_bcast"), ("Gatherv", "pickled_gather"))
SWEEP = "sweep"
NOTICE = "notice"


def parse_size(text: str) -> int:
    """'8', '64K', '16M', '1G' (powers of 1024; a trailing B is allowed) -> bytes."""
    s = text.strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    value = float(s[:-1] if scale > 1 else s)
    if value <= 0:
        raise ValueError(f"size must be positive: {text}")
    return int(value * scale)


def human(nbytes: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes:g} B"


def medians(times: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{op: [sizes, repeats]} -> {op: [sizes]} medians."""
    return {op: np.median(t, axis=1) for op, t in times.items()}


def fit_all(sizes: Sequence[int], times: Mapping[str, np.ndarray]) -> dict[str, AlphaBeta]:
    """An alpha-beta fit of every operation's medians."""
    return {op: fit_alpha_beta(np.asarray(sizes), m) for op, m in medians(times).items()}


def interpolated(sizes: Sequence[int], times: Mapping[str, np.ndarray]) -> dict[str, Interpolated]:
    return {op: Interpolated(np.asarray(sizes), m) for op, m in medians(times).items()}


def sweep_table(sizes: Sequence[int], times: Mapping[str, np.ndarray]) -> str:
    """Median seconds (us) per size and operation, then buffer / pickled ratios."""
    med = medians(times)
    ops = list(med)
    ratios = [(b, p) for b, p in BUFFER_VS_PICKLED if b in med and p in med]
    head = ["size", *(f"{op} us" for op in ops), *(f"{b}/{p}" for b, p in ratios)]
    if "np.add" in med and "Reduce" in med:
        head.append("Reduce GB/s (np.add GB/s)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for i, n in enumerate(sizes):
        cells = [human(n), *(f"{1e6 * med[op][i]:.1f}" for op in ops)]
        cells += [f"{med[b][i] / med[p][i]:.2f}" for b, p in ratios]
        if "np.add" in med and "Reduce" in med:
            cells.append(f"{n / med['Reduce'][i] / 1e9:.2f} ({n / med['np.add'][i] / 1e9:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fit_table(fits: Mapping[str, AlphaBeta]) -> str:
    lines = ["| op | alpha us | 1/beta GB/s | rms rel. error | max rel. error |", "|---|---:|---:|---:|---:|"]
    for op, f in fits.items():
        errors = f"{100 * f.rel_error:.0f}% | {100 * f.max_rel_error:.0f}%"
        lines.append(f"| {op} | {f.alpha_us:.1f} | {f.bandwidth_gbs:.2f} | {errors} |")
    return "\n".join(lines)


def wake_terms(notice: Mapping[str, np.ndarray], fits: Mapping[str, AlphaBeta], nbytes: int) -> dict[str, float]:
    """{op: seconds} a waiting rank adds to a call: the median notice time of ``nbytes`` minus the fit there."""
    return {op: max(0.0, float(np.median(t)) - float(fits[op].predict(nbytes))) for op, t in notice.items()}


def notice_table(notice: Mapping[str, np.ndarray], wake: Mapping[str, float]) -> str:
    lines = ["| op | notice ms (median) | notice ms (max) | wake ms = notice - fit |", "|---|---:|---:|---:|"]
    for op, t in notice.items():
        lines.append(f"| {op} | {1e3 * np.median(t):.3f} | {1e3 * np.max(t):.3f} | {1e3 * wake[op]:.3f} |")
    return "\n".join(lines)


def prediction_table(
    name: str, predicted: Mapping[str, Mapping[str, float]], measured: Mapping[str, Mapping[str, float]]
) -> str:
    """Per label: bytes and seconds predicted next to measured (slowest rank, waiting removed), and the
    ratio measured / predicted of the whole round."""
    lines = [
        f"**{name}**: one training round, predicted vs measured (median over rounds, slowest rank, waiting "
        "removed; raw = waiting included). pred. = fit + wake; interp. = the sweep's medians + wake",
        "",
        "| label | bytes/rank pred. | bytes/rank meas. | ms fit | ms wake | ms pred. | ms interp. | ms meas. "
        "| ms raw | ms waiting |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    total = np.zeros(7)
    algorithm = np.zeros(5)
    for label in dict.fromkeys([*predicted, *measured]):
        p = predicted.get(label, {"bytes": 0.0, "seconds": 0.0, "interpolated": 0.0, "wake": 0.0})
        m = measured.get(label, {"bytes": 0.0, "seconds": 0.0, "seconds_raw": 0.0, "waiting": 0.0})
        fit, wake, interp = p["seconds"], p.get("wake", 0.0), p.get("interpolated", np.nan)
        row = np.array([fit, wake, fit + wake, interp + wake, m["seconds"], m["seconds_raw"], m["waiting"]])
        total += row
        if label in ("down", "up"):
            algorithm += row[:5]
        lines.append(
            f"| {label} | {p['bytes']:.0f} | {m['bytes']:.0f} | " + " | ".join(f"{1e3 * v:.3f}" for v in row) + " |"
        )
    lines.append("| **all** | | | " + " | ".join(f"**{1e3 * v:.3f}**" for v in total) + " |")
    lines.append("| down + up | | | " + " | ".join(f"{1e3 * v:.3f}" for v in algorithm) + " | | |")
    ratio = total[4] / total[2] if total[2] > 0 else np.nan
    ratio_fit = total[4] / total[0] if total[0] > 0 else np.nan
    lines += ["", f"measured / predicted, whole round: {ratio:.2f} (fit alone, without wake: {ratio_fit:.1f})"]
    return "\n".join(lines)


def write_h5(
    path: Path,
    sizes: Sequence[int],
    times: Mapping[str, np.ndarray],
    fits: Mapping[str, AlphaBeta],
    attrs: Mapping[str, object],
    predictions: Sequence[dict] = (),
    notice: Mapping[str, np.ndarray] | None = None,
    wake: Mapping[str, float] | None = None,
) -> None:
    """/sweep/<op>/{sizes, seconds, repeats} and /sweep/<op> attrs alpha, beta, rel_error; root attrs;
    /notice/<op> the notice times of a waiting rank (seconds per repeat), attr wake."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    med = medians(times)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "pfl_mpi-bench-comm"
        f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, list | dict) else value
        f.attrs["predictions"] = json.dumps(list(predictions))
        for op, t in times.items():
            g = f.create_group(f"{SWEEP}/{op}")
            g["sizes"] = np.asarray(sizes, dtype=np.int64)
            g["seconds"] = med[op]
            g["repeats"] = np.asarray(t, dtype=np.float64)
            fit = fits[op]
            g.attrs.update(alpha=fit.alpha, beta=fit.beta, rel_error=fit.rel_error, max_rel_error=fit.max_rel_error)
        for op, t in (notice or {}).items():
            f[f"{NOTICE}/{op}"] = np.asarray(t, dtype=np.float64)
            f[f"{NOTICE}/{op}"].attrs["wake"] = wake[op]


def read_h5(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """(sizes, {op: [sizes, repeats]}, root attrs) of a result file."""
    import h5py

    with h5py.File(path, "r") as f:
        times = {op: g["repeats"][...] for op, g in f[SWEEP].items()}
        sizes = next(iter(f[SWEEP].values()))["sizes"][...]
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    return sizes, times, attrs


def plot(path: Path, sizes: Sequence[int], times: Mapping[str, np.ndarray], fits: Mapping[str, AlphaBeta], title: str):
    """Two log-log panels: the buffer collectives with np.add, and buffer vs pickled; fitted lines dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = medians(times)
    n = np.asarray(sizes, dtype=np.float64)
    grid = np.geomspace(n.min(), n.max(), 200)
    panels = (
        ("buffer collectives", [op for op in ("Bcast", "Reduce", "Allreduce", "Gatherv", "Scatterv", "np.add")]),
        ("buffer vs pickled point-to-point", ["Bcast", "pickled_bcast", "Gatherv", "pickled_gather"]),
    )
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for ax, (name, ops) in zip(axes, panels, strict=True):
        for i, op in enumerate(o for o in ops if o in med):
            color = f"C{i}"
            f = fits[op]
            ax.loglog(n, med[op], "o", color=color, label=f"{op}: {f.alpha_us:.0f} us + n / {f.bandwidth_gbs:.2f} GB/s")
            ax.loglog(grid, f.predict(grid), "--", color=color, linewidth=1)
        ax.set_title(name)
        ax.set_xlabel("bytes per rank")
        ax.grid(True, which="major", alpha=0.4)
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("seconds (median, slowest rank)")
    fig.suptitle(title + "  (points: measured; dashed: t = alpha + beta n)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
