"""Class prototypes of an embedding (FedProto): the distance term, local per-class sums, nearest-prototype
inference, and how far sets of prototypes lie apart (docs/algorithms.md#fedproto)."""

from __future__ import annotations

import math

import torch


def prototype_distance(
    features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """Mean over the batch and the d coordinates of (f(x) - P_y)^2, samples of classes without a prototype as 0
    (torch's MSELoss against targets that equal f(x) where no prototype exists, as in the authors' code)."""
    mask = present[labels].to(features.dtype)[:, None]
    return ((features - prototypes[labels]) ** 2 * mask).sum() / max(features.numel(), 1)


@torch.no_grad()
def local_prototype_sums(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, classes: int, batch_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of f(x) [C, d] and sample counts [C], float64 on the CPU: the local prototypes are
    sums / counts."""
    model.eval()
    sums = torch.zeros(classes, model.feature_dim, dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], batch_size):
        sums.index_add_(0, y[start : start + batch_size], model.base(x[start : start + batch_size]).double())
    counts = torch.bincount(y, minlength=classes).double()
    return sums.cpu(), counts.cpu()


@torch.no_grad()
def nearest_prototype(
    model: torch.nn.Module, x: torch.Tensor, prototypes: torch.Tensor, present: torch.Tensor, batch_size: int = 1024
) -> torch.Tensor:
    """The class of the nearest prototype (squared Euclidean) to f(x) of each sample, among ``present`` ones."""
    model.eval()
    out = []
    for start in range(0, x.shape[0], batch_size):
        distances = ((model.base(x[start : start + batch_size])[:, None, :] - prototypes[None]) ** 2).sum(dim=2)
        out.append(distances.masked_fill(~present, float("inf")).argmin(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


def mean_pair_distance(points: torch.Tensor) -> float:
    """Mean Euclidean distance between two points of one row, over every row and every pair of its points;
    ``points`` [rows, M, d], a point of NaNs is missing (pairs with it are left out). NaN when no pair exists."""
    m = points.shape[1]
    i, j = torch.triu_indices(m, m, offset=1)
    distances = (points[:, i] - points[:, j]).norm(dim=-1)  # [rows, pairs], NaN where a point is missing
    kept = distances[~distances.isnan()]
    return float(kept.mean()) if kept.numel() else math.nan
