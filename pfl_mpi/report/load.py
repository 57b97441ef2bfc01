"""One run file read into plain arrays (committed rounds only), for plots, tables and export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..store.layout import CLIENTS, COMM, PARTITION, RANKS, ROUNDS
from ..store.reader import _attr, open_run

ALGORITHM_LABELS = ("down", "up")  # the algorithm's own messages; every other label is "other"


@dataclass
class Run:
    path: Path
    attrs: dict
    rounds_completed: int
    rounds: dict[str, np.ndarray]  # /rounds/<metric> [R]
    clients: dict[str, np.ndarray]  # /clients/<metric> [R, N] (the state group left out)
    comm_labels: list[str]
    comm: dict[str, np.ndarray]  # /comm/<field> [R, P, L]
    ranks: dict[str, np.ndarray]  # /ranks/<field> [R, P]
    partition: dict[str, np.ndarray]
    legend: str = ""  # set when several runs share a name (see build.py)

    @property
    def name(self) -> str:
        return str(self.attrs.get("name", self.path.stem))

    @property
    def algorithm(self) -> str:
        return str(self.attrs.get("algorithm", "?"))

    @property
    def label(self) -> str:
        """The legend entry: run name and algorithm."""
        if self.legend:
            return self.legend
        return self.name if self.name == self.algorithm else f"{self.name} ({self.algorithm})"

    @property
    def round_numbers(self) -> np.ndarray:
        """1-based round numbers, as the progress lines count them."""
        return np.arange(1, self.rounds_completed + 1)

    @property
    def score(self) -> str:
        """The task's score metric: ``test_acc`` (classification, next token) or ``test_rmse`` (regression)."""
        return "test_rmse" if "test_rmse" in self.rounds else "test_acc"

    @property
    def val_score(self) -> str | None:
        """The task's score on the validation split (``data.eval_on: [val, ...]``): ``val_acc`` or ``val_rmse``;
        None when the run did not evaluate it."""
        return next((name for name in ("val_rmse", "val_acc") if name in self.rounds), None)

    @property
    def loss_metric(self) -> str:
        """The task's test loss: ``test_loss`` or ``test_mse`` (regression)."""
        return "test_mse" if self.score == "test_rmse" else "test_loss"

    def evaluated(self) -> np.ndarray:
        """0-based indices of the rounds with an evaluation."""
        acc = self.rounds.get(self.score, np.full(self.rounds_completed, np.nan))
        return np.flatnonzero(~np.isnan(acc))


def load_run(path: str | Path, clients: bool = True) -> Run:
    """Read ``path`` (read-only, without the file lock, so a running job's file works too)."""
    with open_run(path) as f:
        done = int(f.attrs["rounds_completed"])
        attrs = {k: _attr(v) for k, v in f.attrs.items()}
        rounds = {k: ds[:done] for k, ds in f[ROUNDS].items()}
        client_data = {}
        if clients and CLIENTS in f:
            client_data = {k: ds[:done] for k, ds in f[CLIENTS].items() if hasattr(ds, "shape")}
        comm = {k: ds[:done] for k, ds in f[COMM].items()} if COMM in f else {}
        ranks = {k: ds[:done] for k, ds in f[RANKS].items()} if RANKS in f else {}
        partition = {k: ds[()] for k, ds in f[PARTITION].items()} if PARTITION in f else {}
    return Run(Path(path), attrs, done, rounds, client_data, list(attrs.get("comm_labels", [])), comm, ranks, partition)


def bytes_by_label(run: Run) -> np.ndarray:
    """[R, L] bytes per round per message label, counted as /rounds counts them.

    ``down``: received by the workers; ``up``: sent by the workers; every other label: sent by
    every rank. The sum over labels is ``bytes_down + bytes_up + bytes_other`` of /rounds.
    """
    sent, received = run.comm["bytes_sent"], run.comm["bytes_received"]
    out = sent.sum(axis=1)
    for name, table in (("down", received), ("up", sent)):
        if name in run.comm_labels:
            out[:, run.comm_labels.index(name)] = table[:, 1:, run.comm_labels.index(name)].sum(axis=1)
    return out


def server_seconds_by_label(run: Run) -> np.ndarray:
    """[R, L] rank 0's seconds inside collectives per label (waiting included); sums to seconds_comm."""
    return run.comm["seconds"][:, 0, :]


def group_labels(run: Run, table: np.ndarray) -> dict[str, np.ndarray]:
    """[R, L] per-label values -> {"down", "up", "other"} [R]."""
    groups = {name: np.zeros(table.shape[0]) for name in (*ALGORITHM_LABELS, "other")}
    for j, label in enumerate(run.comm_labels):
        groups[label if label in ALGORITHM_LABELS else "other"] += table[:, j]
    return groups
