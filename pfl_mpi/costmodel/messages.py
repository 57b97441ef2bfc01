"""The messages of one training round, predicted from a configuration, and what a run file measured.

A round without evaluation sends, in order (docs/design.md): ``control`` (Bcast of 2 int64),
``down`` (Bcast of ``down_numel`` or Scatterv of ``down_numel_of(k)`` per sampled client k),
``metrics`` (Gatherv of one float64 row per sampled client), ``up`` (Reduce of ``up_numel + 1``
float32, or of ``up_numel`` in the declared dtype plus a second Reduce of 2 float64; or Gatherv of
``up_numel_of(k)`` per client), ``state`` (Gatherv of the personal state of the sampled clients, of
their architecture group's size, when the algorithm keeps any) and ``ledger`` (a Gatherv of every
rank's counters and an Allgather of its entry times). The sizes come from the algorithm built as
the engine builds it, without training, and from the round's actual sample and placement. A
message's size is per rank, as the benchmark sweeps it: the Bcast/Reduce buffer, or a
Gatherv/Scatterv's mean part per worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..comm import FIELDS, LABELS
from ..comm.world import POLL_MAX_MS, SPIN
from .fit import AlphaBeta, Interpolated

ROUND_LABELS = ("control", "down", "metrics", "up", "state", "ledger")


@dataclass(frozen=True)
class Message:
    label: str  # ledger label
    op: str  # the benchmarked operation that models it
    nbytes: float  # payload per rank of one call


def round_messages(cfg, world_size: int, t: int = 1) -> list[Message]:
    """The messages of training round ``t`` (no evaluation) of ``cfg`` on ``world_size`` ranks."""
    from ..data import load_federated
    from ..runtime.build import build_algorithm
    from ..runtime.placement import held_out, place_clients, sample_clients
    from ..runtime.record import META_COLUMNS, RANK_FIELDS
    from ..wire.plan import make_plan
    from ..wire.transport import Transfer, Transport

    if world_size < 2:
        raise ValueError("nothing moves on one rank")
    data = load_federated(cfg.data, cfg.seed)
    algo = build_algorithm(cfg, data)
    workers = world_size - 1
    host = place_clients(data.train_sizes, list(range(1, world_size)))
    pool = held_out(cfg, data.num_clients)[1]  # never a novel client (data.novel_clients)
    plan = make_plan(sample_clients(cfg.seed, t, data.num_clients, cfg.sampled_per_round, pool), host, world_size)
    per_worker = len(plan.order) / workers  # mean sampled clients per worker

    def mean_per_worker(numel_of) -> float:
        """Mean over workers of the summed per-client sizes of their sampled clients."""
        return sum(numel_of(k) for k in plan.order) / workers

    messages = [Message("control", "Bcast", 16)]
    transfers = Transport(None, algo).schedule(plan, "train")  # what the engine's transport will move

    def per_rank(transfer: Transfer) -> float:
        """The Bcast/Reduce buffer, or a Scatterv/Gatherv's mean part per worker."""
        if transfer.op in ("Bcast", "Reduce"):
            return float(transfer.bytes_per_rank[0])
        return sum(transfer.bytes_per_rank) / workers

    messages += [Message(x.label, x.op, per_rank(x)) for x in transfers if x.label == "down"]
    messages.append(Message("metrics", "Gatherv", per_worker * 8 * (len(META_COLUMNS) + len(algo.client_metrics))))
    messages += [Message(x.label, x.op, per_rank(x)) for x in transfers if x.label == "up"]
    state = [sum(spec.values()) for spec in algo.state_specs()]  # floats per client, by architecture group
    if any(state):
        messages.append(Message("state", "Gatherv", mean_per_worker(lambda k: state[algo.setup.group_of(k)]) * 4))
    ledger_row = 8 * (len(LABELS) * len(FIELDS) + len(RANK_FIELDS))
    calls = len(messages) + 2  # entry times per round: its calls, last round's gather, the Allgather's own
    messages += [Message("ledger", "Gatherv", ledger_row), Message("ledger", "Allreduce", 8 * calls)]
    return messages


def predict_round(
    messages: list[Message],
    fits: Mapping[str, AlphaBeta],
    sweep: Mapping[str, Interpolated] | None = None,
    wake: Mapping[str, float] | None = None,
    waited: Mapping[str, float] | None = None,
    poll_max: float = POLL_MAX_MS / 1000,
) -> dict[str, dict[str, float]]:
    """{label: {"bytes": per rank, "seconds": from the fit, "interpolated": from the sweep's medians,
    "wake": what a waiting rank adds by noticing completion late}}.

    The predicted time of a label is ``seconds + wake`` (or ``interpolated + wake``). ``wake[op]``
    is the sweep's notice delay after a long wait (``comm.sweep``). A call whose longest wait
    was ``w`` (``waited[label]``, seconds per call: the imbalance, which no communication model
    predicts, so it is taken from the run) adds ``wake[op] * min(1, w / poll_max)``, nothing when
    ``w`` is within the poll loop's spin: the polled wait sleeps in intervals doubling up to
    ``poll_max``, so after waiting ``w`` the interval in effect is about ``min(w, poll_max)`` and
    completion lands, on average, in its middle. Without ``waited`` every call adds ``wake[op]``."""
    out: dict[str, dict[str, float]] = {}
    for m in messages:
        row = out.setdefault(m.label, {"bytes": 0.0, "seconds": 0.0, "interpolated": 0.0, "wake": 0.0})
        row["bytes"] += m.nbytes
        row["seconds"] += float(fits[m.op].predict(m.nbytes))
        if sweep is not None:
            row["interpolated"] += float(sweep[m.op].predict(m.nbytes))
        if wake is not None:
            w = poll_max if waited is None else waited.get(m.label, 0.0)
            row["wake"] += float(wake[m.op]) * (min(1.0, w / poll_max) if w > SPIN else 0.0)
    return out


def measured_round(path: str | Path) -> tuple[dict[str, dict[str, float]], list[int], int]:
    """What a run file measured per label in its training rounds without evaluation, round 0 excluded.

    Returns ({label: {"bytes", "seconds", "seconds_raw", "waiting", "calls"}}, the rounds used, world size):
    ``seconds`` is the median over those rounds of the slowest rank's seconds minus its waiting
    (what the benchmark times: the call once every rank is in it), ``seconds_raw`` the same with
    waiting included, ``bytes`` the mean payload per worker (sent + received), ``calls`` per round.
    """
    from ..store import read_comm

    labels, comm = read_comm(path)
    calls = comm["calls"]  # [R, P, L]
    size = calls.shape[1]
    if size < 2:
        raise ValueError(f"{path}: a run on one rank moves nothing")
    eval_calls = calls[:, 0, labels.index("eval_down")] + calls[:, 0, labels.index("eval_metrics")]
    rounds = [t for t in range(1, calls.shape[0]) if eval_calls[t] == 0]
    if not rounds:
        raise ValueError(f"{path}: no training round without evaluation after round 0 (run more rounds)")
    seconds = comm["seconds"][rounds]
    waiting = comm["waiting"][rounds] if "waiting" in comm else np.zeros_like(seconds)
    moved = comm["bytes_sent"][rounds] + comm["bytes_received"][rounds]
    out = {}
    for label in ROUND_LABELS:
        i = labels.index(label)
        if not calls[rounds, 0, i].any():
            continue
        out[label] = {
            "bytes": float(np.median(moved[:, 1:, i].mean(axis=1))),
            "seconds": float(np.median(np.max(seconds[:, :, i] - waiting[:, :, i], axis=1))),
            "seconds_raw": float(np.median(np.max(seconds[:, :, i], axis=1))),
            "waiting": float(np.median(np.max(waiting[:, :, i], axis=1))),
            "calls": float(np.median(calls[rounds, 0, i])),
        }
    return out, rounds, size
