"""What the record keeps of the novel clients served after the last round (runtime/novel.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..training.tasks import Task

PREFIX = "novel_"  # the task's two metrics of a novel client on a split: novel_test_loss, novel_val_acc, ...


@dataclass
class NovelRows:
    """What the server records of the novel clients: per client its id, then per split its samples and the
    task's two metrics, and the protocol bytes its serving downloaded and uploaded (all in the same order)."""

    splits: tuple[str, ...]  # data.eval_on, in scoring order
    rows: np.ndarray  # [n, 1 + 3 * len(splits)]: client, then per split: samples, loss, score
    bytes_down: np.ndarray  # int64 [n]
    bytes_up: np.ndarray  # int64 [n]


def novel_record(task: Task, novel: NovelRows, num_clients: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The round scalars and [N] per-client arrays of the served novel clients."""
    ids = novel.rows[:, 0].astype(np.int64)
    down, up = np.zeros(num_clients, dtype=np.int64), np.zeros(num_clients, dtype=np.int64)
    down[ids], up[ids] = novel.bytes_down, novel.bytes_up  # both in the rows' order
    clients = {"protocol_novel_bytes_down": down, "protocol_novel_bytes_up": up}
    scalars = {"protocol_bytes_novel": float(down.sum() + up.sum())}
    for i, split in enumerate(novel.splits):
        n, loss, score = (novel.rows[:, 1 + 3 * i + j] for j in range(3))
        loss_name, score_name = task.columns(f"{PREFIX}{split}_")
        clients[loss_name], clients[score_name] = np.full(num_clients, np.nan), np.full(num_clients, np.nan)
        clients[loss_name][ids], clients[score_name][ids] = loss, score
        pooled = float(np.sum(n * loss) / np.sum(n))
        scalars[loss_name] = pooled
        scalars[score_name] = task.pooled_score(pooled, float(np.sum(n * score) / np.sum(n)))
        scalars[f"{score_name}_mean"], scalars[f"{score_name}_std"] = float(np.mean(score)), float(np.std(score))
    return scalars, clients


def novel_metric_names(task: Task, splits: tuple[str, ...] = ("test",)) -> tuple[str, ...]:
    """The per-round names the novel clients' serving records on ``splits`` (for reports)."""
    names: tuple[str, ...] = ()
    for split in splits:
        loss_name, score_name = task.columns(f"{PREFIX}{split}_")
        names += (loss_name, score_name, f"{score_name}_mean", f"{score_name}_std")
    return names


def novel_line(rounds: dict[str, np.ndarray]) -> str | None:
    """The novel clients' scores in the last round that served them, in one line (run summary, ``pfl-mpi info``),
    or None for a run without novel clients. ``rounds``: the per-round table (scalars of one round are arrays of
    one value)."""
    scores = sorted(k for k in rounds if k.startswith(PREFIX) and k.endswith(("_acc", "_rmse")))
    if not scores:
        return None
    last = np.flatnonzero(~np.isnan(np.atleast_1d(rounds[scores[0]])))
    if not len(last):
        return None
    i, parts = int(last[-1]), []
    for name in scores:
        value, mean, std = (float(np.atleast_1d(rounds[key])[i]) for key in (name, f"{name}_mean", f"{name}_std"))
        parts.append(f"{name.removeprefix(PREFIX).replace('_', ' ')} {value:.4f} (client mean {mean:.4f} +- {std:.4f})")
    return f"  novel clients, served after round {i + 1}: " + ", ".join(parts)
