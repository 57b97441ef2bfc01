"""The alpha-beta (latency-bandwidth) model of one operation: t(n) = alpha + beta * n."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AlphaBeta:
    """Seconds of one call of ``n`` bytes per rank: ``alpha + beta * n``."""

    alpha: float  # s: latency, the time of an empty message
    beta: float  # s per byte: 1 / bandwidth
    rel_error: float  # root mean square of (fit - measured) / measured over the fitted points
    max_rel_error: float  # largest |fit - measured| / measured

    def predict(self, nbytes: float | np.ndarray) -> float | np.ndarray:
        return self.alpha + self.beta * np.asarray(nbytes, dtype=np.float64)

    @property
    def alpha_us(self) -> float:
        return 1e6 * self.alpha

    @property
    def bandwidth_gbs(self) -> float:
        """1 / beta in GB/s (1 GB = 1e9 bytes); inf when the fit found no size dependence."""
        return 1e-9 / self.beta if self.beta > 0 else float("inf")


def fit_alpha_beta(sizes: np.ndarray, seconds: np.ndarray) -> AlphaBeta:
    """Least squares of the *relative* residuals, (alpha + beta n - t) / t, with alpha, beta >= 0.

    Plain least squares over a sweep from bytes to hundreds of MB is decided by the largest sizes
    alone (their residuals are seconds, the small sizes' microseconds) and can give a negative
    latency; weighting each point by 1/t fits every size to the same relative accuracy.
    """
    n = np.asarray(sizes, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    keep = np.isfinite(t) & (t > 0)
    n, t = n[keep], t[keep]
    if not len(t):
        raise ValueError("no positive times to fit")
    w = 1.0 / t
    design = np.stack([np.ones_like(n), n], axis=1) * w[:, None]
    alpha, beta = np.linalg.lstsq(design, np.ones_like(t), rcond=None)[0] if len(t) > 1 else (t[0], 0.0)
    if alpha < 0:  # through the origin: minimise sum((beta n / t - 1)^2)
        alpha, beta = 0.0, float(np.sum(n / t) / max(np.sum((n / t) ** 2), 1e-300))
    if beta < 0:  # no size dependence: alpha minimising sum((alpha / t - 1)^2)
        alpha, beta = float(np.sum(w) / np.sum(w**2)), 0.0
    rel = (alpha + beta * n - t) / t
    return AlphaBeta(float(alpha), float(beta), float(np.sqrt(np.mean(rel**2))), float(np.max(np.abs(rel))))


@dataclass(frozen=True)
class Interpolated:
    """The sweep's medians, interpolated linearly in log-log (held flat beyond its ends): no model."""

    sizes: np.ndarray
    seconds: np.ndarray

    def predict(self, nbytes: float | np.ndarray) -> float | np.ndarray:
        x = np.log(np.maximum(np.asarray(nbytes, dtype=np.float64), 1.0))
        return np.exp(np.interp(x, np.log(self.sizes.astype(np.float64)), np.log(self.seconds)))
