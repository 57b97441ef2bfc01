"""Stacked parameters: K clients' parameters of one architecture along a leading client dimension, and the
forward pass that runs a model on all K at once (batched GEMMs for Linear layers, ``vmap`` of ``functional_call``
for anything else). Used by the batched loop (``batched.py``) and batched evaluation (``batched_eval.py``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from ..models.nets import SplitModel

Stacked = dict[str, torch.Tensor]
"""Parameters by name, each ``[K, *shape]``: client i's parameters are the i-th slices."""


def blocks(items: Sequence, size: int) -> Iterator[list]:
    """``items`` in consecutive blocks of at most ``size``."""
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def stack(flats: Sequence[Stacked]) -> Stacked:
    """Stack K clients' parameters (each a dict of name -> tensor) into one dict of ``[K, *shape]`` tensors."""
    return {name: torch.stack([f[name] for f in flats]) for name in flats[0]}


def stacked_forward(module: nn.Module, params: Stacked, x: torch.Tensor, prefix: str = "") -> torch.Tensor:
    """``module`` applied to K clients at once: ``x`` is ``[K, B, ...]``, ``params`` the stacked parameters of the
    whole model (names from the root). Linear layers become one batched GEMM (``baddbmm``), element-wise layers
    and flattening act on the stacked tensor, ``Sequential`` chains and a split model (``base``, ``head``) recurse;
    any other module runs under ``vmap`` of ``functional_call``."""
    if isinstance(module, nn.Sequential):
        for name, child in module._modules.items():  # every use (named_children skips a repeated module)
            x = stacked_forward(child, params, x, f"{prefix}{name}.")
        return x
    if isinstance(module, nn.Linear):
        w, b = params[f"{prefix}weight"], params.get(f"{prefix}bias")
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        wt = w.transpose(1, 2)
        out = torch.bmm(flat, wt) if b is None else torch.baddbmm(b.unsqueeze(1), flat, wt)
        return out.view(*x.shape[:-1], w.shape[1])
    if isinstance(module, nn.ReLU):
        return torch.relu(x)
    if isinstance(module, nn.Identity):
        return x
    if isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) == (1, -1):
        return x.flatten(2)
    if type(module) is SplitModel:
        features = stacked_forward(module.base, params, x, "base.")
        return stacked_forward(module.head, params, features, "head.")
    own = {n[len(prefix) :]: p for n, p in params.items() if n.startswith(prefix)}
    return vmap(lambda p, xb: functional_call(module, p, (xb,)))(own, x)


_PROBED: dict[int, str | None] = {}


def probe(model: nn.Module, x: torch.Tensor) -> str | None:
    """Why ``model`` cannot be batched (None: it can): it has buffers, or ``stacked_forward`` fails on it;
    decided once per model by a forward of 2 clients."""
    key = id(model)
    if key not in _PROBED and any(True for _ in model.buffers()):
        _PROBED[key] = "the model has buffers"
    if key not in _PROBED:
        try:
            params = {n: p.detach().unsqueeze(0).expand(2, *p.shape) for n, p in model.named_parameters()}
            with torch.no_grad():
                stacked_forward(model, params, x[:1].expand(2, *x[:1].shape))
            _PROBED[key] = None
        except Exception as err:  # noqa: BLE001 - any failure means: train this model sequentially
            _PROBED[key] = f"vmap cannot run the model ({type(err).__name__})"
    return _PROBED[key]
