"""How much each client's payload counts in a linear aggregate (normalised by the runtime)."""

from __future__ import annotations

from typing import Literal

from .base import Client

Weighting = Literal["samples", "uniform"]


def client_weight(strategy: Weighting, client: Client) -> float:
    """The unnormalised weight of ``client``: its training sample count, or 1."""
    if strategy == "samples":
        return float(client.num_train)
    return 1.0
