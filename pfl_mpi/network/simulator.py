"""The run's simulated network as the engine uses it: built on every rank, one call per round."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .config import NetworkConfig
from .devices import draw_devices
from .round import RoundNetwork, plan_round, selected_per_round

if TYPE_CHECKING:
    from ..config import RunConfig

ProtocolBytes = Callable[[Sequence[int]], tuple[np.ndarray, np.ndarray]]  # clients -> (down, up) bytes each
Sampler = Callable[[int, int, int, int], np.ndarray]  # (seed, round, N, count) -> sorted client ids


class NetworkSimulator:
    """Selects each round's clients (over-selected) and decides which of them train, keeping the simulated
    clock. ``round`` must be called once per round, in order; a resumed run replays the rounds it skips."""

    def __init__(
        self,
        cfg: NetworkConfig,
        seed: int,
        quota: int,
        train_sizes: np.ndarray,
        local_epochs: int,
        protocol_bytes: ProtocolBytes,
        sample: Sampler,
        start_round: int = 0,
    ):
        self.cfg, self.seed, self.quota = cfg, seed, quota
        self.num_clients = len(train_sizes)
        self.work = np.asarray(train_sizes, dtype=np.float64) * local_epochs
        self.protocol_bytes, self.sample = protocol_bytes, sample
        self.per_round = selected_per_round(quota, cfg.over_selection, self.num_clients)
        self.devices = draw_devices(cfg, seed, range(self.num_clients))
        self.clock, self.next_round = 0.0, 0
        for t in range(start_round):  # the clock is a sum over rounds: recompute it, in the same order
            self.round(t)

    def round(self, t: int) -> RoundNetwork:
        """Round t: its selection (``per_round`` clients) and what became of each."""
        if t != self.next_round:
            raise RuntimeError(f"the network simulates round {self.next_round} next, not {t}")
        selected = np.asarray(self.sample(self.seed, t, self.num_clients, self.per_round), dtype=np.int64)
        down, up = self.protocol_bytes(selected.tolist())
        outcome = plan_round(
            self.cfg, self.devices.take(selected), self.seed, t, self.quota, self.work[selected], down, up, self.clock
        )
        self.clock, self.next_round = outcome.clock, t + 1
        return outcome


def simulated_network(
    cfg: RunConfig, train_sizes: np.ndarray, protocol_bytes: ProtocolBytes, sample: Sampler, start_round: int = 0
) -> NetworkSimulator | None:
    """The network of the run ``cfg``, or None when ``network.enabled`` is false."""
    if not cfg.network.enabled:
        return None
    return NetworkSimulator(
        cfg.network,
        cfg.seed,
        cfg.sampled_per_round,
        train_sizes,
        cfg.train.local_epochs,
        protocol_bytes,
        sample,
        start_round,
    )
