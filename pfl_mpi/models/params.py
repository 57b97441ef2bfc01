"""Flat views of a model's parameters (and buffers): the vectors that travel through MPI."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class ParamLayout:
    """Which parameters of a model form a flat vector, in a fixed order.

    The layout is built from one model and applies to any model with the same parameter names and shapes
    (e.g. the rank's single model instance, loaded with each client's parameters in turn). A name may also
    be a persistent buffer's (``split_names`` adds them by ``model.buffers``): it travels as float32 (an
    integer buffer such as BatchNorm's ``num_batches_tracked`` is loaded back rounded toward zero) and its
    gradient is 0.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        params = dict(model.named_parameters())
        names = tuple(names)
        if any(n not in params for n in names):
            params.update(model.named_buffers())
        missing = [n for n in names if n not in params]
        if missing:
            raise KeyError(f"model has no parameters named {missing}")
        if len(set(names)) != len(names):
            raise ValueError("parameter names repeat")
        self.names: tuple[str, ...] = names
        self.shapes: tuple[torch.Size, ...] = tuple(params[n].shape for n in names)
        self.numels: tuple[int, ...] = tuple(params[n].numel() for n in names)
        self.numel: int = sum(self.numels)
        self._cached: tuple[nn.Module, list[nn.Parameter]] | None = None

    def _params(self, model: nn.Module) -> list[nn.Parameter]:
        """The model's parameters of this layout; looked up once per model (this is on the per-client path)."""
        if self._cached is not None and self._cached[0] is model:
            return self._cached[1]
        params = [_tensor(model, n) for n in self.names]
        for p, shape, n in zip(params, self.shapes, self.names, strict=True):
            if p.shape != shape:
                raise ValueError(f"parameter {n} has shape {tuple(p.shape)}, the layout has {tuple(shape)}")
        self._cached = (model, params)
        return params

    def flatten(self, model: nn.Module) -> torch.Tensor:
        """The parameters as one 1-D float32 contiguous CPU tensor (a detached copy)."""
        params = self._params(model)
        if not params:
            return torch.zeros(0, dtype=torch.float32)
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        return flat.to(device="cpu", dtype=torch.float32).contiguous()

    @torch.no_grad()
    def load(self, model: nn.Module, flat: torch.Tensor) -> None:
        """Copy ``flat`` (any device, any float dtype) into the model's parameters, in place."""
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(f"expected a 1-D tensor of {self.numel} values, got shape {tuple(flat.shape)}")
        params = self._params(model)
        if not params:
            return
        flat = flat.to(device=params[0].device)
        for p, chunk in zip(params, flat.split(self.numels), strict=True):
            p.copy_(chunk.view(p.shape))

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parameters of a flat vector as named views of their shapes (for ``torch.func.functional_call``)."""
        chunks = flat.split(self.numels)
        return {n: c.view(shape) for n, c, shape in zip(self.names, chunks, self.shapes, strict=True)}

    def grads(self, model: nn.Module) -> torch.Tensor:
        """The gradients as one 1-D float32 CPU tensor; zeros for parameters whose ``.grad`` is None."""
        params = self._params(model)
        if not params:
            return torch.zeros(0, dtype=torch.float32)
        parts = [
            p.grad.detach().reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)
            for p in params
        ]
        return torch.cat([t.to(parts[0].device, torch.float32) for t in parts]).to("cpu").contiguous()


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


def split_names(model: nn.Module, personal: Callable[[str], bool]) -> tuple[list[str], list[str]]:
    """(shared, personal) names: the parameters in ``model.named_parameters()`` order, then the persistent
    buffers (``models.split``): under ``model.buffers: shared`` split by ``personal`` like parameters, under
    ``personal`` all personal. A network without buffers gets exactly its parameters."""
    from pfl_mpi.models.split import buffer_names, buffer_policy

    shared: list[str] = []
    own: list[str] = []
    for name, _ in model.named_parameters():
        (own if personal(name) else shared).append(name)
    buffers = buffer_names(model)
    all_personal = buffer_policy(model) == "personal"
    for name in buffers:
        (own if all_personal or personal(name) else shared).append(name)
    return shared, own
