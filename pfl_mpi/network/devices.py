"""Each client's device: bandwidths, latency, compute speed and availability phase, a function of (seed, client)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .config import NetworkConfig
from .draws import DOWN, LATENCY, PHASE, SPEED, UP, device_normal, device_uniform
from .trace import read_trace


@dataclass(frozen=True)
class Devices:
    """Device properties of clients, float64 arrays in the order of ``clients``."""

    clients: np.ndarray  # int64
    down_mbps: np.ndarray
    up_mbps: np.ndarray
    latency_ms: np.ndarray
    speed: np.ndarray
    phase: np.ndarray  # in [0, 1): where the client's availability cycle starts

    def take(self, clients: Sequence[int]) -> Devices:
        """The devices of ``clients`` (ids of this table's clients, which must be 0..n-1)."""
        ids = np.asarray(clients, dtype=np.int64)
        columns = (self.down_mbps, self.up_mbps, self.latency_ms, self.speed, self.phase)
        return Devices(self.clients[ids], *(c[ids] for c in columns))


def _lognormal(median: float, sigma: float, seed: int, client: int, what: int) -> float:
    return median if sigma == 0 else median * math.exp(sigma * device_normal(seed, client, what))


def draw_devices(cfg: NetworkConfig, seed: int, clients: Sequence[int], trace: dict[str, np.ndarray] | None = None):
    """The devices of ``clients``: row k mod M of ``trace`` (the file ``cfg.trace``, read if not given), or
    lognormal draws around the configured medians."""
    ids = np.asarray(clients, dtype=np.int64)
    phase = np.array([device_uniform(seed, int(k), PHASE) for k in ids], dtype=np.float64)
    if cfg.trace is not None:
        table = read_trace(cfg.trace) if trace is None else trace
        rows = ids % len(table["speed"])
        return Devices(ids, *(table[c][rows] for c in ("down_mbps", "up_mbps", "latency_ms", "speed")), phase)
    spec = (
        (cfg.down_mbps, cfg.bandwidth_sigma, DOWN),
        (cfg.up_mbps, cfg.bandwidth_sigma, UP),
        (cfg.latency_ms, cfg.latency_sigma, LATENCY),
        (cfg.speed, cfg.speed_sigma, SPEED),
    )
    columns = [np.array([_lognormal(m, s, seed, int(k), w) for k in ids], dtype=np.float64) for m, s, w in spec]
    return Devices(ids, *columns, phase)
