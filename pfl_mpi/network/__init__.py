"""The simulated network and devices: who takes part in a round and how long it takes (no MPI, no torch).

Everything is a pure function of (seed, client) for a device and (seed, client, round) for a round, so
every rank computes the same outcome without a message. See docs/network.md.
"""

from .config import NetworkConfig
from .devices import Devices, draw_devices
from .round import RoundNetwork, Status, availability, client_seconds, plan_round, selected_per_round
from .simulator import NetworkSimulator, simulated_network
from .trace import read_trace

__all__ = [
    "Devices",
    "NetworkConfig",
    "NetworkSimulator",
    "RoundNetwork",
    "Status",
    "availability",
    "client_seconds",
    "draw_devices",
    "plan_round",
    "read_trace",
    "selected_per_round",
    "simulated_network",
]
