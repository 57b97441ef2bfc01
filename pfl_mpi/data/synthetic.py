"""Synthetic(alpha, beta) and Synthetic-IID of FedProx (Li et al., MLSys 2020, section 5).

Client k has its own model and inputs:
    u_k ~ N(0, alpha), W_k ~ N(u_k, 1) [d x C], b_k ~ N(u_k, 1) [C]
    B_k ~ N(0, beta),  v_k ~ N(B_k, 1) [d],      x ~ N(v_k, Sigma), Sigma = diag(j^-1.2), j = 1..d
    y = argmax softmax(W_k^T x + b_k)
Synthetic-IID: one W, b ~ N(0, 1) for all clients and x ~ N(0, Sigma). As in the authors' generator, the
second argument of N(., .) is a standard deviation. Client sizes: int(lognormal(4, 2)) + 50.

Sizes come from one stream of the seed (cheap, known on every rank); client k's model and samples from
its own stream of (seed, k), so a client is generated identically wherever and whenever it is asked for.
"""

from __future__ import annotations

import numpy as np

from pfl_mpi.data.config import SyntheticConfig
from pfl_mpi.data.seeding import Stream, rng


def sizes(cfg: SyntheticConfig, num_clients: int, seed: int) -> np.ndarray:
    """Samples (train + test) of every client: int(lognormal(size_mean, size_sigma)) + size_offset, capped."""
    draw = rng(seed, Stream.SYNTHETIC_SIZES).lognormal(cfg.size_mean, cfg.size_sigma, num_clients)
    n = np.floor(np.minimum(draw, np.iinfo(np.int64).max / 4)).astype(np.int64) + cfg.size_offset
    if cfg.max_samples is not None:
        n = np.minimum(n, cfg.max_samples)
    return n


def _diag_std(dimension: int) -> np.ndarray:
    return np.arange(1, dimension + 1, dtype=np.float64) ** (-1.2 / 2)


def generate(cfg: SyntheticConfig, seed: int, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Client k's ``n`` samples: x float32 [n, d], y int64 [n]."""
    d, c = cfg.dimension, cfg.num_classes
    g = rng(seed, Stream.SYNTHETIC_CLIENT, k)
    if cfg.iid:
        shared = rng(seed, Stream.SYNTHETIC_SHARED)
        w = shared.normal(0.0, 1.0, (d, c))
        b = shared.normal(0.0, 1.0, c)
        mean_x = np.zeros(d)
    else:
        u = g.normal(0.0, cfg.alpha)
        big_b = g.normal(0.0, cfg.beta)
        mean_x = g.normal(big_b, 1.0, d)
        w = g.normal(u, 1.0, (d, c))
        b = g.normal(u, 1.0, c)
    x = mean_x + g.standard_normal((n, d)) * _diag_std(d)
    y = np.argmax(x @ w + b, axis=1)  # softmax is monotone: its argmax is the logits' argmax
    return x.astype(np.float32), y.astype(np.int64)
