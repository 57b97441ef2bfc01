"""The comparison table of report.md: final and best accuracy, bytes and wall time per run."""

from __future__ import annotations

import math

import numpy as np

from .load import Run, bytes_by_label, server_seconds_by_label

COLUMNS = (
    ("run", "run"),
    ("algorithm", "algorithm"),
    ("rounds", "rounds"),
    ("status", "status"),
    ("final_acc", "final test acc"),
    ("best_acc", "best test acc"),
    ("best_round", "best at round"),
    ("final_client_mean", "final client mean acc"),
    ("finetune_acc", "fine-tuned test acc"),
    ("bytes_algorithm", "bytes down+up"),
    ("bytes_total", "bytes total"),
    ("wall_seconds", "wall time (s)"),
)


def summarise(run: Run) -> dict[str, object]:
    """The table's row for one run (numbers as in the file: sums over the committed rounds)."""
    r, ev = run.rounds, run.evaluated()
    row: dict[str, object] = {
        "run": run.name,
        "algorithm": run.algorithm,
        "rounds": run.rounds_completed,
        "status": run.attrs.get("status", "?"),
        "final_acc": math.nan,
        "best_acc": math.nan,
        "best_round": None,
        "final_client_mean": math.nan,
        "finetune_acc": math.nan,
    }
    if len(ev):
        acc = r["test_acc"][ev]
        best = int(ev[int(np.argmax(acc))])
        row.update(
            final_acc=float(acc[-1]),
            best_acc=float(acc.max()),
            best_round=best + 1,
            final_client_mean=float(r["test_acc_mean"][ev[-1]]),
        )
    ft = r.get("finetune_test_acc")
    if ft is not None and np.any(~np.isnan(ft)):
        row["finetune_acc"] = float(ft[~np.isnan(ft)][-1])
    algo = sum(float(r[k].sum()) for k in ("bytes_down", "bytes_up") if k in r)
    row["bytes_algorithm"] = int(round(algo))
    row["bytes_total"] = int(round(algo + float(r["bytes_other"].sum()))) if "bytes_other" in r else int(round(algo))
    row["wall_seconds"] = float(r["seconds_wall"].sum()) if "seconds_wall" in r else math.nan
    return row


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def comparison_table(runs: list[Run]) -> str:
    rows = [summarise(run) for run in runs]
    return markdown_table([title for _, title in COLUMNS], [[row[key] for key, _ in COLUMNS] for row in rows])


def label_table(run: Run) -> str:
    """Per message label totals over the run: calls, bytes (counted as /rounds counts them), rank 0's seconds."""
    calls = run.comm["calls"].sum(axis=(0, 1))
    moved = bytes_by_label(run).sum(axis=0)
    seconds = server_seconds_by_label(run).sum(axis=0)
    rows = [
        [label, int(calls[j]), int(round(moved[j])), float(seconds[j])]
        for j, label in enumerate(run.comm_labels)
        if calls[j] > 0
    ]
    return markdown_table(["label", "calls (all ranks)", "bytes", "rank 0 seconds"], rows)
