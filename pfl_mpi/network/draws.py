"""The network's random numbers, each a pure function of integers: a device's of (seed, client), a round's
of (seed, client, round). No generator state, so every rank draws the same values in any order.

Uniforms are the top 53 bits of ``derive_seed`` (exact in float64); normals come from two uniforms by
Box-Muller, computed with Python's ``math`` (IEEE float64, the same libm on every node).
"""

from __future__ import annotations

import math

from ..seeding import derive_seed

DEVICE = 0x4E45_5444  # "NETD": stream tag of device properties, apart from the runtime's tags
ROUND = 0x4E45_5452  # "NETR": stream tag of per-round draws

# what each draw is for: the last key of its stream
DOWN, UP, LATENCY, SPEED, PHASE = range(5)  # per device
AVAILABLE, DROPOUT = range(2)  # per round


def uniform(*keys: int) -> float:
    """A float64 in [0, 1), a pure function of ``keys``."""
    return (derive_seed(*keys) >> 10) * 2.0**-53


def normal(*keys: int) -> float:
    """A standard normal, a pure function of ``keys``."""
    u1 = 1.0 - uniform(*keys, 0)  # in (0, 1]
    u2 = uniform(*keys, 1)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def device_normal(seed: int, client: int, what: int) -> float:
    return normal(seed, DEVICE, client, what)


def device_uniform(seed: int, client: int, what: int) -> float:
    return uniform(seed, DEVICE, client, what)


def round_uniform(seed: int, client: int, round: int, what: int) -> float:
    return uniform(seed, ROUND, client, round, what)
