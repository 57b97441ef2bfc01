"""Splitting one client's samples into its train and test sets."""

from __future__ import annotations

import numpy as np


def held_out_counts(sizes: np.ndarray | int, fraction: float) -> np.ndarray:
    """Test samples of clients with ``sizes`` samples: round(n * fraction), kept within [1, n - 1]."""
    n = np.asarray(sizes, dtype=np.int64)
    if np.any(n < 2):
        raise ValueError("every client needs at least 2 samples to have 1 train and 1 test sample")
    return np.clip(np.floor(n * fraction + 0.5).astype(np.int64), 1, n - 1)


def split_positions(
    labels: np.ndarray, fraction: float, stratify: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into ``labels``) of the train and the test samples, each in random order.

    Stratified: the samples are ordered by label (randomly within a label) and the test set is a systematic
    sample with a random start, so each label's share of the test set is within one sample of its share of
    the client's data.
    """
    n = len(labels)
    n_test = int(held_out_counts(n, fraction))
    if stratify:
        order = np.lexsort((rng.random(n), labels))
        picks = np.floor((np.arange(n_test) + rng.random()) * (n / n_test)).astype(np.int64)
        test = order[picks]
    else:
        test = rng.permutation(n)[:n_test]
    is_test = np.zeros(n, dtype=bool)
    is_test[test] = True
    train = np.flatnonzero(~is_test)
    return rng.permutation(train), rng.permutation(test)
