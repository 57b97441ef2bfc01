"""Random streams derived from integers, so that nothing depends on which rank computes what."""

from __future__ import annotations

import numpy as np
import torch

_CLIENT = 2  # stream tag of a client's local training


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of ``keys`` (their number included: numpy's
    SeedSequence alone maps [a, b] and [a, b, 0] to the same stream)."""
    state = np.random.SeedSequence([len(keys), *(int(k) for k in keys)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def client_generator(seed: int, client: int, round: int) -> torch.Generator:
    """The CPU generator of client ``client`` in round ``round``."""
    generator = torch.Generator()
    generator.manual_seed(derive_seed(seed, _CLIENT, client, round))
    return generator
