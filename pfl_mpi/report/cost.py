"""What a run paid for its accuracy: cumulative protocol bytes and simulated time per round, and what it
had paid when its test accuracy first reached a target.

Bytes are the protocol ledger's training traffic (``/rounds/protocol_bytes_down`` and ``_up``, what the
round's clients would download and upload in a deployment; evaluation traffic, ``protocol_bytes_eval``,
is not counted). Time is the simulated network's clock (``/rounds/simulated_time``); a run without the
simulated network has none, which is ``None`` here, never zeros.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .groups import Group, mean_std
from .load import Run
from .tables import markdown_table

NO_NETWORK = "no simulated network"
NOT_REACHED = "not reached"


@dataclass
class Cost:
    """Per committed round of one run: cumulative protocol bytes and simulated time (None where the file has
    no protocol ledger, or no simulated network)."""

    down: np.ndarray | None
    up: np.ndarray | None
    seconds: np.ndarray | None

    @property
    def total(self) -> np.ndarray | None:
        return None if self.down is None or self.up is None else self.down + self.up


def cumulative(run: Run) -> Cost:
    """Cumulative protocol bytes down and up, and the simulated clock, at the end of each committed round."""
    r = run.rounds

    def summed(name: str) -> np.ndarray | None:
        return np.cumsum(np.nan_to_num(r[name].astype(np.float64))) if name in r else None

    clock = r.get("simulated_time")
    return Cost(summed("protocol_bytes_down"), summed("protocol_bytes_up"), None if clock is None else clock * 1.0)


def has_clock(run: Run) -> bool:
    """Whether the run had the simulated network (and so a simulated clock)."""
    return "simulated_time" in run.rounds


@dataclass
class Reached:
    """What a run had paid at the end of the first evaluated round whose test accuracy was >= the target;
    ``round`` (1-based) is None when it never got there. NaN: not reached, or not recorded."""

    round: int | None
    down: float = math.nan
    up: float = math.nan
    seconds: float = math.nan


def to_target(run: Run, target: float) -> Reached:
    """The run's cost to reach ``target`` test accuracy (``/rounds/test_acc``, evaluated rounds only)."""
    acc = run.rounds.get("test_acc", np.full(run.rounds_completed, np.nan))
    hits = np.flatnonzero(np.nan_to_num(acc, nan=-1.0) >= target)
    if not len(hits):
        return Reached(None)
    t, cost = int(hits[0]), cumulative(run)

    def at(values: np.ndarray | None) -> float:
        return math.nan if values is None else float(values[t])

    return Reached(t + 1, at(cost.down), at(cost.up), at(cost.seconds))


def final_accuracy(run: Run) -> float:
    ev = run.evaluated()
    return float(run.rounds[run.score][ev[-1]]) if len(ev) else math.nan


def run_row(run: Run, target: float | None = None) -> dict[str, object]:
    """One run's costs: totals over its committed rounds and, with ``target``, what it paid to reach it."""
    cost = cumulative(run)
    last = run.rounds_completed - 1

    def total(values: np.ndarray | None) -> float:
        return float(values[last]) if values is not None and last >= 0 else math.nan

    row: dict[str, object] = {
        "final_acc": final_accuracy(run),
        "protocol_bytes_down": total(cost.down),
        "protocol_bytes_up": total(cost.up),
        "simulated_time": total(cost.seconds),
        "simulated_round_seconds": float(np.mean(run.rounds["simulated_round_seconds"]))
        if has_clock(run) and run.rounds_completed
        else math.nan,
        "network": has_clock(run),
    }
    if target is not None:
        reached = to_target(run, target)
        row.update(
            target_round=reached.round,
            target_bytes_down=reached.down,
            target_bytes_up=reached.up,
            target_seconds=reached.seconds,
        )
    return row


def _cell(values: list[float], fmt: str) -> str:
    mean, std, n = mean_std(values)
    if not n:
        return "-"
    return f"{mean:{fmt}}" if n == 1 else f"{mean:{fmt}} ± {std:{fmt}}"


def _reached_cell(rows: list[dict[str, object]], key: str, fmt: str, needs_clock: bool = False) -> str:
    """Mean ± std over the runs that reached the target, with how many did when not all."""
    if needs_clock and not any(row["network"] for row in rows):
        return NO_NETWORK
    reached = [row for row in rows if row["target_round"] is not None]
    if not reached:
        return NOT_REACHED
    cell = _cell([float(row[key]) for row in reached], fmt)
    return cell if len(reached) == len(rows) else f"{cell} ({len(reached)}/{len(rows)} reached)"


def _clock_cell(rows: list[dict[str, object]], key: str, fmt: str) -> str:
    if not any(row["network"] for row in rows):
        return NO_NETWORK
    cell = _cell([float(row[key]) for row in rows if row["network"]], fmt)
    with_clock = sum(bool(row["network"]) for row in rows)
    return cell if with_clock == len(rows) else f"{cell} ({with_clock}/{len(rows)} with a network)"


def cost_table(groups: list[Group], target: float | None = None) -> str:
    """Per group (mean ± sample std over its runs): final accuracy, protocol bytes down and up over the run,
    simulated time (total, mean per round) and, with ``target``, the round, bytes and simulated time at which
    the test accuracy first reached it."""
    header = ["group", "n", "final test acc", "protocol bytes down", "protocol bytes up", "simulated time (s)"]
    header.append("simulated s per round")
    if target is not None:
        header += [f"round to {target:g}", f"bytes down to {target:g}", f"bytes up to {target:g}"]
        header.append(f"simulated s to {target:g}")
    body = []
    for group in groups:
        rows = [run_row(run, target) for run in group.runs]
        cells: list[object] = [
            group.legend,
            group.n,
            _cell([float(row["final_acc"]) for row in rows], ".4f"),
            _cell([float(row["protocol_bytes_down"]) for row in rows], ".4g"),
            _cell([float(row["protocol_bytes_up"]) for row in rows], ".4g"),
            _clock_cell(rows, "simulated_time", ".2f"),
            _clock_cell(rows, "simulated_round_seconds", ".3f"),
        ]
        if target is not None:
            cells += [
                _reached_cell(rows, "target_round", ".4g"),
                _reached_cell(rows, "target_bytes_down", ".4g"),
                _reached_cell(rows, "target_bytes_up", ".4g"),
                _reached_cell(rows, "target_seconds", ".2f", needs_clock=True),
            ]
        body.append(cells)
    return markdown_table(header, body)


TOTALS = ("final_acc", "protocol_bytes_down", "protocol_bytes_up", "simulated_time", "simulated_round_seconds")
TARGETS = ("target_round", "target_bytes_down", "target_bytes_up", "target_seconds")


def write_cost_csv(groups: list[Group], path: Path, target: float | None = None) -> Path:
    """cost.csv: one row per run, its group, seed and every value of ``run_row`` at full precision (NaN: no
    simulated network, or the target not reached; ``target_round`` empty when not reached)."""
    keys = [*TOTALS, *(TARGETS if target is not None else ())]
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["file", "group", "seed", *keys] + (["target_acc"] if target is not None else []))
        for group in groups:
            for run in group.runs:
                row = run_row(run, target)
                cells = ["" if row[k] is None else repr(row[k]) for k in keys]
                extra = [repr(target)] if target is not None else []
                out.writerow([run.path.name, group.legend, run.attrs.get("seed", ""), *cells, *extra])
    return path
