"""Training losses a user brings (``train.loss: tests.plugins.user_losses:<name>``), for the task tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

CALLS: list[tuple[tuple[int, ...], tuple[int, ...]]] = []  # (outputs shape, targets shape) of every call


def smoothed(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with label smoothing 0.1."""
    CALLS.append((tuple(outputs.shape), tuple(targets.shape)))
    return F.cross_entropy(outputs, targets, label_smoothing=0.1)


def one_argument(outputs: torch.Tensor) -> torch.Tensor:
    return outputs.sum()


NOT_A_FUNCTION = 3


def unreduced(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample losses, left unreduced (refused: the loop needs the batch's mean)."""
    return F.cross_entropy(outputs, targets, reduction="none")


def wrong_targets(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Reads the outputs of classes the model does not have: fails on the first batch."""
    return outputs.gather(1, targets.unsqueeze(1) + 100).mean()
