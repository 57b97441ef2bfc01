"""Nested state (dicts of dicts of tensors or numbers, e.g. a torch optimizer's ``state_dict()["state"]``) as the
flat ``{dotted.name: array}`` the run file stores, and back.

Keys are joined with "."; a number becomes a 0-d array; on the way back, a key part made of digits becomes an
int (torch optimizers key their state by parameter index). Lists and other leaves are refused: they are
configuration, which the run file keeps as YAML, not state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

Nested = Mapping[str, Any]


def flatten_state(state: Nested, prefix: str = "") -> dict[str, np.ndarray]:
    """``{"opt": {"state": {0: {"step": t}}}}`` -> ``{"opt.state.0.step": array}`` (CPU copies)."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if "." in str(key) and isinstance(value, Mapping):
            raise ValueError(f"state key {name!r}: a key of a nested dict may not contain '.'")
        if isinstance(value, Mapping):
            out.update(flatten_state(value, f"{name}."))
        elif isinstance(value, torch.Tensor):
            out[name] = value.detach().cpu().numpy().copy()
        elif isinstance(value, (bool, int, float, np.number, np.ndarray)):
            out[name] = np.array(value)
        else:
            raise TypeError(f"state {name!r} is a {type(value).__name__}: only tensors, arrays and numbers are state")
    return out


def unflatten_state(flat: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, Any]:
    """The inverse of :func:`flatten_state`, with tensors as leaves (names without "." stay flat keys)."""
    out: dict[Any, Any] = {}
    for name, value in flat.items():
        parts = [int(p) if p.isdigit() else p for p in name.split(".")]
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = torch.as_tensor(value)
    return out
