"""Algorithms by name. A new algorithm is one file that decorates its class with ``@register``."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ..errors import ConfigError
from .base import Algorithm

_REGISTRY: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make ``cls`` available as ``algorithm.name: <cls.name>``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"algorithm name {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def algorithm_names() -> list[str]:
    return sorted(_REGISTRY)


def resolve(section: dict[str, Any]) -> tuple[type[Algorithm], Any]:
    """The class named by a config's ``algorithm`` section and its validated parameters."""
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
