"""The evaluated scores of one round as the lines of the run summary and of ``pfl-mpi info``: per held-out split
of ``data.eval_on`` (validation first, then test), classification's accuracy or regression's RMSE, pooled and
as the client mean +- std, with the pooled loss."""

from __future__ import annotations

import math
from collections.abc import Mapping

SPLITS = (("val", "validation"), ("test", "test"))
SCORES = (("acc", "accuracy", "loss", "loss"), ("rmse", "RMSE", "mse", "MSE"))  # (score, its name, loss, its name)


def score_lines(values: Mapping[str, float], lead: str) -> list[str]:
    """One line per (split, score) that ``values`` (metric name -> value of one round) holds a finite value of,
    e.g. ``  final test accuracy 0.9123 (client mean 0.9050 +- 0.0400), test loss 0.3012`` for ``lead`` "final"."""
    lines = []
    for split, split_name in SPLITS:
        for score, score_name, loss, loss_name in SCORES:
            value = float(values.get(f"{split}_{score}", math.nan))
            if math.isnan(value):
                continue
            mean, std = float(values[f"{split}_{score}_mean"]), float(values[f"{split}_{score}_std"])
            lines.append(
                f"  {lead} {split_name} {score_name} {value:.4f} (client mean {mean:.4f} +- {std:.4f}), "
                f"{split_name} {loss_name} {float(values[f'{split}_{loss}']):.4f}"
            )
    return lines
