"""Random streams of the data package, each a pure function of (seed, purpose, client)."""

from __future__ import annotations

from enum import IntEnum

import numpy as np

# Keeps the data package's streams apart from other packages' streams of the same run seed.
_SALT = 0x5EED_DA7A


class Stream(IntEnum):
    """What a stream is used for; one independent stream per purpose (and per client where relevant)."""

    PARTITION = 1  # dealing pooled samples to clients (one stream for all clients)
    SPLIT = 2  # client k's train/test split
    SYNTHETIC_SIZES = 3  # synthetic sample counts of all clients
    SYNTHETIC_CLIENT = 4  # client k's synthetic model and samples
    SYNTHETIC_SHARED = 5  # the W, b shared by all clients in Synthetic-IID
    VAL = 6  # client k's validation samples taken from its training samples (data.val_fraction)
    USERS = 7  # which users of a natural partition are kept (data.max_clients)
    OFFICIAL = 8  # dealing an official test (or validation) split out to the clients


def rng(seed: int, stream: Stream, client: int = 0) -> np.random.Generator:
    """The generator for ``stream`` (of ``client``) under ``seed``.

    The key always has the same length: numpy's SeedSequence gives [a, b] and [a, b, 0] the same state.
    """
    return np.random.default_rng([int(seed), _SALT, int(stream), int(client)])
