"""The server's record of a round: metrics summarised from what came up, checked, then written.

A round's record is built at the end of the round and written while the workers train the next
one (I/O off the critical path); it is committed to the file when written.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..comm import ALGORITHM_LABELS, FIELDS, LABELS
from ..data.config import EVAL_SPLITS
from ..errors import DivergenceError
from ..network import RoundNetwork
from ..store import RunWriter
from ..store.nested import flatten_state
from ..training.tasks import CLASSIFICATION, Task
from ..wire.protocol import evaluation_bytes, training_bytes
from .novel_record import NovelRows, novel_record

RANK_FIELDS = ("compute_seconds", "aggregate_seconds", "cpu_seconds", "wall_seconds")
META_COLUMNS = ("client", "weight", "num_train")  # first columns of a training-metrics row
# an evaluation row of the test split alone: client, test samples, then the task's two metrics (test_loss, test_acc;
# test_mse, test_rmse), then the extra columns
EVAL_COLUMNS = ("client", "num_test", "test_loss", "test_acc")
SPLIT_SIZES = tuple(f"num_{split}" for split in EVAL_SPLITS)  # the first column of each split's group


def extra_columns(task: Task, finetune: bool, global_model: bool, split: str = "test") -> tuple[str, ...]:
    """The evaluation's extra columns of ``split``: the task's metrics after fine-tuning (after the last round's
    evaluation) and of the global model (where personal ones differ)."""
    finetuned = task.columns(f"finetune_{split}_") if finetune else ()
    return finetuned + (task.columns(f"global_{split}_") if global_model else ())


def split_metric(name: str, split: str) -> str:
    """An algorithm's evaluation metric (named for the test split, e.g. ``head_test_acc``) on ``split``:
    ``head_val_acc``; a name without ``test`` gets the split as a prefix."""
    if split == "test":
        return name
    return name.replace("test", split, 1) if "test" in name else f"{split}_{name}"


def eval_columns(
    task: Task, splits: tuple[str, ...], algorithm_metrics: tuple[str, ...], finetune: bool, global_model: bool
) -> tuple[str, ...]:
    """Every column of an evaluation row: client, then per split (``data.eval_on``) its samples (``num_<split>``),
    the task's two metrics, the algorithm's ``eval_metrics`` and the extra columns, all named after the split. With
    the test split alone: ``EVAL_COLUMNS`` then the algorithm's metrics and ``extra_columns``."""
    columns = ["client"]
    for split in splits:
        columns += [f"num_{split}", *task.columns(f"{split}_"), *(split_metric(m, split) for m in algorithm_metrics)]
        columns += extra_columns(task, finetune, global_model, split)
    return tuple(columns)


@dataclass
class RoundArrivals:
    """What rank 0 holds at the end of round t, for the recorder to summarise."""

    t: int
    clients: list[int]  # the trained clients, in the order of their rows
    started: tuple[float, float]  # the server's (wall, cpu) clock when the round began
    client_rows: np.ndarray  # training rows: META_COLUMNS, then the algorithm's metrics
    algorithm_metrics: dict[str, float]  # what the aggregation reported
    state_rows: np.ndarray | None  # the trained clients' states, flat (None: the algorithm keeps none)
    evaluated: tuple[np.ndarray | None, tuple[str, ...]]  # evaluation rows and their columns, if due
    ledgers: np.ndarray  # every rank's message ledger and timings
    snapshot: bool  # a global-state snapshot is due
    network: RoundNetwork | None = None  # the round's simulated network, when there is one
    novel: NovelRows | None = None  # the served novel clients' rows (runtime/novel.py), in the last round


@dataclass
class RoundRecord:
    """Everything the file gets for one round (arrays are the server's own copies)."""

    t: int
    scalars: dict[str, float]
    clients: dict[str, np.ndarray]
    comm: dict[str, np.ndarray]
    ranks: dict[str, np.ndarray]
    server_state: dict[str, np.ndarray]
    state: dict[str, tuple[np.ndarray, np.ndarray]]  # table key -> (rows, values) of the clients that trained
    global_state: dict[str, np.ndarray] | None  # a snapshot is due
    started: tuple[float, float]  # the server's (wall, cpu) clock when the round began


def summarise(
    t: int,
    num_clients: int,
    metric_names: tuple[str, ...],
    client_rows: np.ndarray,
    evaluated: tuple[np.ndarray | None, tuple[str, ...]],
    ledgers: np.ndarray,
    workers: list[int],
    task: Task = CLASSIFICATION,
) -> tuple[dict[str, float], dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Round scalars, [N] per-client arrays, [P, L] comm tables and [P] rank timings of one round.

    ``evaluated``: the evaluation rows and their column names (``eval_columns``), or (None, ()). Each split's
    two metrics are named after ``task`` (``test_loss``/``test_acc``, ``val_mse``/``val_rmse``); a round's value is
    the mean over the clients weighted by the split's samples (RMSE: the root of that mean of the MSE), ``*_mean``
    and ``*_std`` of the score are over clients unweighted. The test split's two per-client arrays exist every
    round (NaN when not evaluated).
    """
    evaluated, columns = evaluated
    ids = client_rows[:, 0].astype(np.int64)
    samples = client_rows[:, 2]
    clients: dict[str, np.ndarray] = {"participated": np.zeros(num_clients, dtype=bool)}
    clients["participated"][ids] = True
    for j, name in enumerate(metric_names):
        clients[name] = np.full(num_clients, np.nan)
        clients[name][ids] = client_rows[:, len(META_COLUMNS) + j]
    loss_column = len(META_COLUMNS) + metric_names.index("train_loss")
    scalars = {
        "round": t,
        "num_sampled": len(ids),
        "world_size": ledgers.shape[0],
        "train_loss": float(np.sum(samples * client_rows[:, loss_column]) / np.sum(samples)) if len(ids) else math.nan,
    }
    loss_name, score_name = task.columns()
    clients[loss_name], clients[score_name] = np.full(num_clients, np.nan), np.full(num_clients, np.nan)
    if evaluated is not None:
        eids = evaluated[:, 0].astype(np.int64)
        starts = [j for j, name in enumerate(columns) if name in SPLIT_SIZES] + [len(columns)]
        for start, stop in zip(starts[:-1], starts[1:], strict=True):
            split = _summarise_split(task, evaluated[:, start:stop], columns[start:stop], eids, num_clients)
            scalars.update(split[0])
            clients.update(split[1])
    table = ledgers[:, : len(LABELS) * len(FIELDS)].reshape(-1, len(LABELS), len(FIELDS))
    per_rank = ledgers[:, len(LABELS) * len(FIELDS) :]
    sent, received, seconds, cpu = (FIELDS.index(f) for f in ("bytes_sent", "bytes_received", "seconds", "cpu_seconds"))
    algorithm_rows = [LABELS.index(label) for label in ALGORITHM_LABELS]
    remote = [r for r in workers if r != 0]  # with P = 1 nothing moves
    scalars.update(
        bytes_down=float(table[remote, LABELS.index("down"), received].sum()),
        bytes_up=float(table[remote, LABELS.index("up"), sent].sum()),
        bytes_other=float(np.delete(table[:, :, sent], algorithm_rows, axis=1).sum()),
        seconds_compute=float(per_rank[workers, RANK_FIELDS.index("compute_seconds")].max()),
        seconds_aggregate=float(per_rank[0, RANK_FIELDS.index("aggregate_seconds")]),
        seconds_comm=float(table[0, :, seconds].sum()),
        seconds_comm_wait=float(table[0, :, FIELDS.index("waiting")].sum()),
        server_wait_cpu=float(table[0, :, cpu].sum() / max(table[0, :, seconds].sum(), 1e-9)),
    )
    comm = {field: table[:, :, i] for i, field in enumerate(FIELDS)}
    ranks = {field: per_rank[:, i] for i, field in enumerate(RANK_FIELDS)}
    return scalars, clients, comm, ranks


def _summarise_split(
    task: Task, block: np.ndarray, names: tuple[str, ...], eids: np.ndarray, num_clients: int
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Round scalars and [N] per-client arrays of one split's columns (``names``: ``num_<split>``, the task's loss
    and score, then pairs of further (loss, score) columns), weighted by the split's samples."""
    n, loss, score = block[:, 0], block[:, 1], block[:, 2]
    loss_name, score_name = task.columns(names[0].removeprefix("num_") + "_")
    clients = {name: np.full(num_clients, np.nan) for name in (loss_name, score_name, *names[3:])}
    clients[loss_name][eids], clients[score_name][eids] = loss, score
    pooled = float(np.sum(n * loss) / np.sum(n))
    scalars = {
        loss_name: pooled,
        score_name: task.pooled_score(pooled, float(np.sum(n * score) / np.sum(n))),
        f"{score_name}_mean": float(np.mean(score)),
        f"{score_name}_std": float(np.std(score)),
    }
    extra = names[3:]
    for j, name in enumerate(extra):
        values = block[:, 3 + j]
        clients[name][eids] = values
        scalars[name] = float(np.sum(n * values) / np.sum(n))
    for loss_col, score_col in zip(extra[::2], extra[1::2], strict=True):  # RMSE: the root of the pooled MSE
        scalars[score_col] = task.pooled_score(scalars[loss_col], scalars[score_col])
    return scalars, clients


LOSSES = ("train_loss", "test_loss", "test_mse", "val_loss", "val_mse")  # a NaN or infinity here stops the run


def non_finite(scalars: dict[str, float], server_state: dict[str, np.ndarray]) -> list[str]:
    """What became NaN or infinite: losses, or any floating part of the server's state."""
    bad = [k for k in LOSSES if not math.isfinite(scalars.get(k, 0.0))]
    bad += [
        f"server state {k}"
        for k, v in server_state.items()
        if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()
    ]
    return bad


def write(writer: RunWriter, record: RoundRecord, ended: tuple[float, float]) -> dict[str, float]:
    """Write and commit ``record``; ``ended`` is the server's (wall, cpu) clock when the round's window closed."""
    start = time.perf_counter()
    wall = ended[0] - record.started[0]
    scalars = dict(record.scalars, seconds_wall=wall, server_cpu=(ended[1] - record.started[1]) / max(wall, 1e-9))
    writer.append_round(record.t, scalars, record.clients, record.comm, record.ranks)
    rows = {key: r for key, (r, _) in record.state.items()}
    writer.checkpoint(record.t, record.server_state, rows, {key: v for key, (_, v) in record.state.items()})
    if record.global_state is not None:
        writer.snapshot(record.t, record.global_state)
    writer.commit(record.t)
    scalars["seconds_io"] = time.perf_counter() - start  # the flush included; the value itself
    writer.set_round_value(record.t, "seconds_io", scalars["seconds_io"])  # reaches the disk with the next flush
    return scalars


PROTOCOL_TOTALS = {  # per-client protocol table -> its round total in /rounds
    "protocol_bytes_down": "protocol_bytes_down",
    "protocol_bytes_up": "protocol_bytes_up",
    "protocol_eval_bytes_down": "protocol_bytes_eval",
}


def protocol_ledger(
    algo, trained: list[int], evaluated: Iterable[int], downloaded: Iterable[int] = ()
) -> dict[str, np.ndarray]:
    """The round's protocol bytes per client, int64 [N]: what each trained client downloaded and uploaded, and
    what each ``evaluated`` client downloaded to be evaluated; 0 for a client that moved nothing.
    ``downloaded``: clients that downloaded but never uploaded (the simulated network's dropped, late and
    over-selected clients)."""
    n = algo.setup.num_clients
    down, up = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    down[trained], up[trained] = training_bytes(algo, trained)
    downloaded = [int(k) for k in downloaded]
    down[downloaded] = training_bytes(algo, downloaded)[0]
    evaluation, evaluated = np.zeros(n, dtype=np.int64), [int(k) for k in evaluated]
    evaluation[evaluated] = evaluation_bytes(algo, evaluated)
    return {"protocol_bytes_down": down, "protocol_bytes_up": up, "protocol_eval_bytes_down": evaluation}


class Recorder:
    """The server's records during a run: each round is summarised and checked when it ends, and written
    and committed while the workers train the next one (``flush``)."""

    def __init__(self, writer: RunWriter, algo, layout, metric_names: tuple[str, ...], workers: list[int], progress):
        self.writer, self.algo, self.layout, self.progress = writer, algo, layout, progress
        self.metric_names, self.workers = metric_names, workers
        self.pending: RoundRecord | None = None
        self.last_metrics: dict[str, float] | None = None

    def keep(self, came: RoundArrivals) -> DivergenceError | None:
        """Summarise a round from what came up to rank 0 and keep it to write; a NaN or infinity is not kept
        but returned as the error that stops the run."""
        t, clients, evaluated, network, novel = came.t, came.clients, came.evaluated, came.network, came.novel
        num_clients = self.algo.setup.num_clients
        scalars, per_client, comm, ranks = summarise(
            t, num_clients, self.metric_names, came.client_rows, evaluated, came.ledgers, self.workers,
            self.algo.setup.task,
        )  # fmt: skip
        scalars.update({k: float(v) for k, v in came.algorithm_metrics.items()})
        downloaded = () if network is None else network.downloaded
        evaluated_ids = () if evaluated[0] is None else evaluated[0][:, 0].astype(np.int64)
        protocol = protocol_ledger(self.algo, clients, evaluated_ids, downloaded)
        per_client.update(protocol)
        scalars.update({PROTOCOL_TOTALS[name]: float(values.sum()) for name, values in protocol.items()})
        if network is not None:
            per_client.update(network.client_tables(num_clients))
            scalars.update(network.scalars())
        if novel is not None:
            novel_scalars, novel_clients = novel_record(self.algo.setup.task, novel, num_clients)
            scalars.update(novel_scalars)
            per_client.update(novel_clients)
        server_state = flatten_state(self.algo.server_state())
        bad = non_finite(scalars if len(clients) else {**scalars, "train_loss": 0.0}, server_state)  # none trained
        if bad:
            return DivergenceError(
                f"round {t + 1}: {', '.join(bad)} became NaN or infinite; stopped, "
                f"the file keeps the {t} completed round(s)"
            )
        state = self.layout.split(clients, came.state_rows) if came.state_rows is not None else {}
        global_state = None
        if came.snapshot:
            global_state = {k: v.detach().cpu().numpy().copy() for k, v in self.algo.global_state().items()}
        self.pending = RoundRecord(t, scalars, per_client, comm, ranks, server_state, state, global_state, came.started)
        return None

    def flush(self, ended: tuple[float, float]) -> None:
        """Write and commit the kept round, if any, and show it (``ended``: the server's (wall, cpu) clock)."""
        if self.pending is None:
            return
        self.last_metrics = write(self.writer, self.pending, ended)
        self.pending = None
        self.progress.update(self.last_metrics)
