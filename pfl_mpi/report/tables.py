"""The tables of report.md: per group (mean ± sample std over its runs, and n) and per run: final and best
accuracy, bytes and wall time."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from .groups import Group, mean_std
from .load import Run, bytes_by_label, server_seconds_by_label

COLUMNS = (
    ("run", "run"),
    ("seed", "seed"),
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

# with a validation split (data.eval_on: [val, test]): the selection a tuner makes, on val, and its test score
VAL_COLUMNS = (
    ("final_val_acc", "final val acc"),
    ("best_val_acc", "best val acc"),
    ("best_val_round", "best val at round"),
    ("test_at_best_val", "test acc at best val"),
)

# with novel clients (data.novel_clients): their score after serving (pooled by test samples, and client mean)
NOVEL_COLUMNS = (("novel_acc", "novel test acc"), ("novel_client_mean", "novel client mean acc"))


def summarise(run: Run) -> dict[str, object]:
    """The table's row for one run (numbers as in the file: sums over the committed rounds)."""
    r, ev = run.rounds, run.evaluated()
    row: dict[str, object] = {
        "run": run.name,
        "seed": run.attrs.get("seed"),
        "algorithm": run.algorithm,
        "rounds": run.rounds_completed,
        "status": run.attrs.get("status", "?"),
        "final_acc": math.nan,
        "best_acc": math.nan,
        "best_round": None,
        "final_client_mean": math.nan,
        "finetune_acc": math.nan,
    }
    if len(ev):  # the task's score: accuracy (best: highest) or, for regression, RMSE (best: lowest)
        acc, lowest = r[run.score][ev], run.score == "test_rmse"
        best = int(ev[int(np.argmin(acc) if lowest else np.argmax(acc))])
        row.update(
            final_acc=float(acc[-1]),
            best_acc=float(r[run.score][best]),
            best_round=best + 1,
            final_client_mean=float(r[f"{run.score}_mean"][ev[-1]]),
        )
    if run.val_score is not None:
        row.update(_validation(run))
    row.update(_novel(run))
    ft = r.get(f"finetune_{run.score}")
    if ft is not None and np.any(~np.isnan(ft)):
        row["finetune_acc"] = float(ft[~np.isnan(ft)][-1])
    algo = sum(float(r[k].sum()) for k in ("bytes_down", "bytes_up") if k in r)
    row["bytes_algorithm"] = int(round(algo))
    row["bytes_total"] = int(round(algo + float(r["bytes_other"].sum()))) if "bytes_other" in r else int(round(algo))
    row["wall_seconds"] = float(r["seconds_wall"].sum()) if "seconds_wall" in r else math.nan
    for name in protocol_fields(run):
        row[name] = int(round(float(np.nansum(r[name]))))
    return row


def _validation(run: Run) -> dict[str, object]:
    """The final and best validation score, the (1-based) round of the best, and the test score of that round
    (NaN when the test split was not evaluated)."""
    r, name = run.rounds, run.val_score
    ev = np.flatnonzero(~np.isnan(r[name]))
    if not len(ev):
        return {}
    val = r[name][ev]
    best = int(ev[int(np.argmin(val) if name == "val_rmse" else np.argmax(val))])
    test = r.get(run.score, np.full(run.rounds_completed, np.nan))
    return {
        "final_val_acc": float(val[-1]),
        "best_val_acc": float(r[name][best]),
        "best_val_round": best + 1,
        "test_at_best_val": float(test[best]),
    }


def _novel(run: Run) -> dict[str, float]:
    """The novel clients' score (``novel_test_acc``, or ``novel_test_rmse``) and its client mean, where served."""
    score = run.rounds.get(f"novel_{run.score}")
    if score is None or not np.any(~np.isnan(score)):
        return {}
    last = int(np.flatnonzero(~np.isnan(score))[-1])
    return {"novel_acc": float(score[last]), "novel_client_mean": float(run.rounds[f"novel_{run.score}_mean"][last])}


def has_novel(runs: list[Run]) -> bool:
    """Whether any of ``runs`` served novel clients (the tables then show their columns)."""
    return any(f"novel_{run.score}" in run.rounds for run in runs)


def has_validation(runs: list[Run]) -> bool:
    """Whether any of ``runs`` evaluated a validation split (the tables then show its columns)."""
    return any(run.val_score is not None for run in runs)


def protocol_fields(run: Run) -> list[str]:
    """The ``/rounds/protocol_bytes_*`` fields of a run (per-protocol byte counts), if it has any."""
    return sorted(name for name in run.rounds if name.startswith("protocol_bytes_"))


def _columns(runs: list[Run]) -> list[tuple[str, str]]:
    """COLUMNS (titled RMSE rather than acc when every run is a regression) and a column per
    ``protocol_bytes_*`` field that any of the runs has."""
    extra = sorted({name for run in runs for name in protocol_fields(run)})
    columns = [*COLUMNS[:9], *(VAL_COLUMNS if has_validation(runs) else ()), *COLUMNS[9:10]]
    columns += [*(NOVEL_COLUMNS if has_novel(runs) else ()), *COLUMNS[10:]]
    return [*((k, score_title(t, runs)) for k, t in columns), *((name, name.replace("_", " ")) for name in extra)]


def score_title(title: str, runs: list[Run]) -> str:
    """``title`` with "acc" read as "rmse" when every run's task is a regression (``Run.score``)."""
    regression = bool(runs) and all(run.score == "test_rmse" for run in runs)
    return title.replace(" acc", " rmse") if regression else title


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
    """One row per run."""
    rows = [summarise(run) for run in runs]
    columns = _columns(runs)
    return markdown_table([title for _, title in columns], [[row.get(key) for key, _ in columns] for row in rows])


# the group table's statistics: key of ``summarise``, title, format of mean and std
STATISTICS = (
    ("final_acc", "final test acc", ".4f"),
    ("best_acc", "best test acc", ".4f"),
    ("final_client_mean", "final client mean acc", ".4f"),
    ("finetune_acc", "fine-tuned test acc", ".4f"),
    ("bytes_algorithm", "bytes down+up", ".4g"),
    ("bytes_total", "bytes total", ".4g"),
    ("wall_seconds", "wall time (s)", ".2f"),
)

VAL_STATISTICS = tuple((k, title, ".1f" if k == "best_val_round" else ".4f") for k, title in VAL_COLUMNS)
NOVEL_STATISTICS = tuple((k, title, ".4f") for k, title in NOVEL_COLUMNS)


def group_statistics(groups: list[Group]) -> list[dict[str, object]]:
    """Per group: its legend, n, seeds, rounds, and (mean, sample std, count) of every statistic and of
    every ``protocol_bytes_*`` total, over the group's runs (NaN values, e.g. no fine-tuning, left out)."""
    extra = sorted({name for g in groups for run in g.runs for name in protocol_fields(run)})
    if has_novel([run for g in groups for run in g.runs]):
        extra = [*(k for k, _, _ in NOVEL_STATISTICS), *extra]
    if has_validation([run for g in groups for run in g.runs]):
        extra = [*(k for k, _, _ in VAL_STATISTICS), *extra]
    out = []
    for group in groups:
        rows = [summarise(run) for run in group.runs]
        rounds = sorted({int(row["rounds"]) for row in rows})
        stats: dict[str, object] = {
            "group": group.legend,
            "n": group.n,
            "seeds": " ".join(group.seeds),
            "rounds": str(rounds[0]) if len(rounds) == 1 else f"{rounds[0]}-{rounds[-1]}",
        }
        for key in [k for k, _, _ in STATISTICS] + extra:
            stats[key] = mean_std([_number(row.get(key)) for row in rows])
        out.append(stats)
    return out


def _number(value: object) -> float:
    return math.nan if value is None else float(value)


def _mean_std_cell(stat: tuple[float, float, int], fmt: str) -> str:
    mean, std, n = stat
    if not n:
        return "-"
    return f"{mean:{fmt}}" if n == 1 else f"{mean:{fmt}} ± {std:{fmt}}"


def group_table(groups: list[Group]) -> str:
    """One row per group: mean ± sample std (ddof=1) over its runs, and n."""
    stats = group_statistics(groups)
    extra = [k for k in (stats[0] if stats else {}) if k.startswith("protocol_bytes_")]
    val = VAL_STATISTICS if stats and "final_val_acc" in stats[0] else ()
    novel = NOVEL_STATISTICS if stats and "novel_acc" in stats[0] else ()
    columns = [*STATISTICS[:4], *val, *novel, *STATISTICS[4:], *((k, k.replace("_", " "), ".4g") for k in extra)]
    runs = [run for g in groups for run in g.runs]
    header = ["group", "n", "seeds", "rounds", *(score_title(title, runs) for _, title, _ in columns)]
    rows = [
        [s["group"], s["n"], s["seeds"] or "-", s["rounds"], *(_mean_std_cell(s[k], fmt) for k, _, fmt in columns)]
        for s in stats
    ]
    return markdown_table(header, rows)


def write_group_csv(groups: list[Group], path: Path) -> Path:
    """groups.csv: the group table at full precision, ``<statistic>_mean``, ``_std`` and ``_n`` columns."""
    stats = group_statistics(groups)
    keys = [k for k in (stats[0] if stats else {}) if k not in ("group", "n", "seeds", "rounds")]
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["group", "n", "seeds", "rounds", *(f"{k}_{part}" for k in keys for part in ("mean", "std", "n"))])
        for s in stats:
            values = [repr(s[k][0]) if s[k][2] else "nan" for k in keys]
            cells = [v for k, mean in zip(keys, values, strict=True) for v in (mean, repr(s[k][1]), str(s[k][2]))]
            out.writerow([s["group"], s["n"], s["seeds"], s["rounds"], *cells])
    return path


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
