"""Random streams derived from integers (seed, purpose, client, round), so that nothing depends on which rank
computes what. The ground floor: every layer may use it (the data package keeps its own numpy streams in
``data/seeding.py``)."""

from __future__ import annotations

import hashlib
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_CLIENT = 2  # stream tag of a client's local training


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of ``keys`` (a hash of their number and values).

    Cheap (a few microseconds: it runs once per client per round) and free of the trap of
    numpy's SeedSequence, which maps [a, b] and [a, b, 0] to the same stream.
    """
    packed = struct.pack(f"<{len(keys) + 1}q", len(keys), *keys)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> 1


def client_generator(seed: int, client: int, round: int) -> torch.Generator:
    """The CPU generator of client ``client`` in round ``round``."""
    import torch  # here, so that the network's draws (and the config schema) import without torch

    generator = torch.Generator()
    generator.manual_seed(derive_seed(seed, _CLIENT, client, round))
    return generator
