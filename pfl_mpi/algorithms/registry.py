"""Algorithms by name. A new algorithm is one file that decorates its class with ``@register``."""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..errors import ConfigError

if TYPE_CHECKING:
    from .base import Algorithm

_REGISTRY: dict[str, type[Algorithm]] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    """Import every module of the package (once): the algorithms' modules register their classes."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{module.name}")
    _builtins_loaded = True


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make ``cls`` available as ``algorithm.name: <cls.name>``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"algorithm name {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def algorithm_names() -> list[str]:
    """Every registered name: the built-ins and what plugins registered."""
    _load_builtins()
    return sorted(_REGISTRY)


def resolve(section: dict[str, Any]) -> tuple[type[Algorithm], Any]:
    """The class named by a config's ``algorithm`` section and its validated parameters."""
    _load_builtins()
    options = dict(section)
    name = options.pop("name", None)
    if name not in _REGISTRY:
        raise ConfigError("algorithm.name", f"unknown algorithm {name!r}; known: {', '.join(algorithm_names())}")
    cls = _REGISTRY[name]
    try:
        return cls, cls.Params.model_validate(options)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(["algorithm", *map(str, first["loc"])])
        raise ConfigError(key, first["msg"]) from None
