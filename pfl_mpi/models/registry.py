"""Networks that plugins register by name: ``model.name: <name>`` builds ``factory(input_shape, num_classes,
**options)``. Torch-free, so that the configuration schema can check names without importing torch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_MODELS: dict[str, Callable[..., Any]] = {}


def register_model(name: str, factory: Callable[..., Any] | None = None):
    """Make ``factory`` available as ``model.name: <name>``; without ``factory``, a decorator.

    ``factory(input_shape, num_classes, **options)`` returns a ``torch.nn.Module``; its keyword parameters are
    the options the model section may set (docs/models.md)."""

    def add(f: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(f):
            raise TypeError(f"model {name!r}: the factory must be callable, got {type(f).__name__}")
        if not _same(_MODELS.get(name, f), f):
            raise ValueError(f"model name {name!r} is registered twice")
        _MODELS[name] = f
        return f

    return add if factory is None else add(factory)


def _same(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """The same factory, or the same function of the same file imported again (under another module name)."""
    code_a, code_b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    same_source = code_a is not None and code_b is not None and code_a.co_filename == code_b.co_filename
    return a is b or (same_source and a.__qualname__ == b.__qualname__)


def registered_names() -> list[str]:
    """Every name plugins registered (so far), sorted."""
    return sorted(_MODELS)


def registered(name: str) -> Callable[..., Any] | None:
    return _MODELS.get(name)
