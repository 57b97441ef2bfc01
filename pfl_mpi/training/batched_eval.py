"""Batched evaluation: K clients' models scored on their test sets with one forward per chunk of rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .stacked import Stacked, probe, stacked_forward

EVAL_ROWS = 16
"""Test rows per client in the first chunk of ``batched_evaluate`` (the chunks then double, up to
``EVAL_MAX_ROWS``): fixed shapes, so a client's scores do not depend on which clients share its block."""
EVAL_MAX_ROWS = 1024


def evaluable(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> str | None:
    """Why ``batched_evaluate`` cannot score ``model`` on (x, y) (None: it can): classification's float features
    and integer labels, a model without buffers that ``stacked_forward`` runs."""
    if x.dtype not in (torch.float32, torch.float64) or x.shape[0] == 0:
        return "inputs that are not float features"
    if y.dtype != torch.int64 or y.dim() != 1:
        return "targets that are not class labels"
    return probe(model, x)


def _chunks(n: int, rows: int) -> list[tuple[int, int]]:
    """(first row, rows) of the chunks that cover ``n`` rows: ``rows``, ``rows``, then doubling up to
    ``EVAL_MAX_ROWS``; the same cut for every client, so a row's chunk does not depend on the block."""
    out, begin = [], 0
    while begin < n:
        width = min(max(begin, rows), EVAL_MAX_ROWS)
        out.append((begin, width))
        begin += width
    return out


@torch.no_grad()
def batched_evaluate(
    model: nn.Module, params: Stacked, data: Sequence[tuple[torch.Tensor, torch.Tensor]], rows: int = EVAL_ROWS
) -> list[tuple[float, float]]:
    """``loop.evaluate`` (mean cross-entropy, accuracy) of K clients at once: client i's model is ``model``
    with the i-th slices of ``params``, its test set ``data[i]``. Each client's rows go through in chunks
    (``_chunks``: ``rows``, ``rows``, 2 ``rows``, 4 ``rows``, ...; its last one padded with its first row, weight
    0); a chunk's forward serves every client that still has rows (beyond the first chunk, their parameters
    gathered). The accuracy counts exactly as the sequential one; the loss differs by float rounding."""
    model.eval()
    sizes = [int(y.shape[0]) for _, y in data]
    x_all, y_all = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    device = x_all.device
    starts = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], device=device).unsqueeze(1)
    ns = torch.tensor(sizes, device=device).unsqueeze(1)
    loss = torch.zeros(len(data), dtype=torch.float64, device=device)
    correct = torch.zeros(len(data), dtype=torch.int64, device=device)
    for begin, width in _chunks(max(sizes, default=0), rows):
        active = [i for i, n in enumerate(sizes) if n > begin]  # the clients with rows in this chunk
        if active == list(range(active[-1] + 1)):  # a prefix (every client in the first chunk): views
            pick: slice | torch.Tensor = slice(0, len(active))
        else:
            pick = torch.tensor(active, device=device)
        position = begin + torch.arange(width, device=device)
        real = position < ns[pick]
        idx = torch.where(real, starts[pick] + position, starts[pick])
        logits = stacked_forward(model, {n: p[pick] for n, p in params.items()}, x_all[idx])
        target = y_all[idx]
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(len(active), width)
        loss[pick] += (ce * real).sum(dim=1).double()
        correct[pick] += ((logits.argmax(dim=-1) == target) & real).sum(dim=1)
    loss_of, correct_of = loss.cpu().tolist(), correct.cpu().tolist()
    return [(loss_of[i] / max(n, 1), correct_of[i] / max(n, 1)) for i, n in enumerate(sizes)]
