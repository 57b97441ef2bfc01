"""One round on the simulated network: who takes part, how long each client and the round take.

A pure function of its arguments (per-round draws of (seed, client, round)), run on every rank without
communication. Float64 throughout; only +, *, / and comparisons on the arrays, so equal on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from .config import NetworkConfig
from .devices import Devices
from .draws import AVAILABLE, DROPOUT, round_uniform


class Status(IntEnum):
    """A client's fate in a round: the ``network_status`` code in the run file (0: not selected)."""

    NOT_SELECTED = 0
    ARRIVED = 1  # its update arrived in time and among the first K: it trained
    UNAVAILABLE = 2  # did not answer the selection: downloaded nothing
    DROPPED = 3  # downloaded, then dropped out: its upload never arrived
    MISSED_DEADLINE = 4  # downloaded; would have finished after the deadline
    OVER_SELECTED = 5  # downloaded and finished in time, but after the K-th arrival: not kept


DOWNLOADED = (Status.DROPPED, Status.MISSED_DEADLINE, Status.OVER_SELECTED)  # downloaded, did not train


@dataclass(frozen=True)
class RoundNetwork:
    """The outcome of round ``t`` for its selected clients (arrays in ``selected`` order)."""

    t: int
    selected: np.ndarray  # int64, sorted client ids
    status: np.ndarray  # int64 Status codes
    seconds: np.ndarray  # float64 download + compute + upload; NaN for an unavailable client
    round_seconds: float  # how long the server waited
    clock: float  # simulated time at the end of the round, since the start of the run

    @property
    def kept(self) -> np.ndarray:
        """The clients that train this round (sorted ids)."""
        return self.selected[self.status == Status.ARRIVED]

    @property
    def downloaded(self) -> np.ndarray:
        """Clients that downloaded the round's payload but did not train (their download is still paid)."""
        return self.selected[np.isin(self.status, DOWNLOADED)]

    def count(self, status: Status) -> int:
        return int(np.count_nonzero(self.status == status))

    def scalars(self) -> dict[str, float]:
        """The round's values in ``/rounds``."""
        return {
            "simulated_round_seconds": self.round_seconds,
            "simulated_time": self.clock,
            "clients_selected": float(len(self.selected)),
            "clients_unavailable": float(self.count(Status.UNAVAILABLE)),
            "clients_dropped": float(self.count(Status.DROPPED)),
            "clients_missed_deadline": float(self.count(Status.MISSED_DEADLINE)),
            "clients_over_selected": float(self.count(Status.OVER_SELECTED)),
        }

    def client_tables(self, num_clients: int) -> dict[str, np.ndarray]:
        """The round's rows of ``/clients``: status codes (int64, 0 = not selected) and seconds (NaN: none)."""
        status = np.zeros(num_clients, dtype=np.int64)
        seconds = np.full(num_clients, np.nan, dtype=np.float64)
        status[self.selected], seconds[self.selected] = self.status, self.seconds
        return {"network_status": status, "simulated_seconds": seconds}


def selected_per_round(quota: int, over_selection: float, num_clients: int) -> int:
    """ceil(K (1 + over_selection)) clients, at most all of them (rounded to 1e-9 first: 10 x 1.3 is 13)."""
    return min(num_clients, math.ceil(round(quota * (1.0 + over_selection), 9)))


def availability(cfg: NetworkConfig, phase: np.ndarray, t: int) -> np.ndarray:
    """Probability that each client (of ``phase``) is available in round t."""
    if cfg.availability_period == 0:
        return np.full(len(phase), cfg.availability)
    angle = [2.0 * math.pi * (t / cfg.availability_period + float(p)) for p in phase]
    swing = np.array([math.sin(a) for a in angle], dtype=np.float64)
    return np.clip(cfg.availability + cfg.availability_amplitude * swing, 0.0, 1.0)


def client_seconds(
    cfg: NetworkConfig, devices: Devices, work: np.ndarray, down_bytes: np.ndarray, up_bytes: np.ndarray
) -> np.ndarray:
    """Download + compute + upload seconds of each client of ``devices``; ``work``: training samples times
    local epochs."""
    latency = devices.latency_ms / 1e3
    down = latency + np.asarray(down_bytes, dtype=np.float64) * 8.0 / (devices.down_mbps * 1e6)
    compute = cfg.seconds_per_sample * np.asarray(work, dtype=np.float64) / devices.speed
    up = latency + np.asarray(up_bytes, dtype=np.float64) * 8.0 / (devices.up_mbps * 1e6)
    return down + compute + up


def plan_round(
    cfg: NetworkConfig,
    devices: Devices,
    seed: int,
    t: int,
    quota: int,
    work: np.ndarray,
    down_bytes: np.ndarray,
    up_bytes: np.ndarray,
    clock: float = 0.0,
) -> RoundNetwork:
    """Round t for the clients of ``devices`` (the round's selection, sorted ids), of which the server keeps the
    first ``quota`` to arrive; ``work``, ``down_bytes``, ``up_bytes`` per client; ``clock``: simulated time so far.

    A client is available with its availability probability, then drops out with probability ``dropout``;
    the others finish after ``client_seconds``; those within the deadline arrive in order of time (ties by
    id) and the first ``quota`` are kept. The server waits until the ``quota``-th arrival; short of it, until
    the deadline, or without one until every available client has arrived or dropped out."""
    ids = devices.clients
    u_avail = np.array([round_uniform(seed, int(k), t, AVAILABLE) for k in ids], dtype=np.float64)
    u_drop = np.array([round_uniform(seed, int(k), t, DROPOUT) for k in ids], dtype=np.float64)
    available = u_avail < availability(cfg, devices.phase, t)
    dropped = available & (u_drop < cfg.dropout)
    seconds = client_seconds(cfg, devices, work, down_bytes, up_bytes)
    late = available & ~dropped & (cfg.deadline is not None) & (seconds > (cfg.deadline or 0.0))
    on_time = available & ~dropped & ~late

    status = np.full(len(ids), int(Status.UNAVAILABLE), dtype=np.int64)
    status[dropped], status[late] = Status.DROPPED, Status.MISSED_DEADLINE
    arrivals = np.flatnonzero(on_time)
    arrivals = arrivals[np.lexsort((ids[arrivals], seconds[arrivals]))]
    status[arrivals[:quota]], status[arrivals[quota:]] = Status.ARRIVED, Status.OVER_SELECTED

    if len(arrivals) >= quota:
        waited = float(seconds[arrivals[quota - 1]])
    elif cfg.deadline is not None:
        waited = float(cfg.deadline)
    else:
        waited = float(seconds[available].max()) if available.any() else 0.0
    seconds = np.where(available, seconds, np.nan)
    return RoundNetwork(t, ids.copy(), status, seconds, waited, clock + waited)
