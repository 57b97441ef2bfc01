"""Your own network: ``model.name`` = ``package.module:factory`` or a name a plugin registered.

The factory is called as ``factory(input_shape, num_classes, **options)`` and returns a ``torch.nn.Module``.
Its parameters after the first two are the options the model section may set (with their annotations as
types and their defaults); any other key of the section is refused with a line naming it. A factory with
``**kwargs`` accepts any key. The module is imported on every rank when the configuration is validated
(plugins first), so a factory in a plugin file is ``<file stem>:<function>``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from pfl_mpi.errors import ConfigError
from pfl_mpi.models.config import ArchitectureConfig
from pfl_mpi.models.registry import registered, registered_names

# keys of the section that are the framework's, never a factory's option
RESERVED = ("name", "head", "head_layers", "buffers", "architectures", "assignment")


def find_factory(name: str, key: str = "model.name") -> Callable[..., Any]:
    """The factory that ``model.name`` names; ConfigError ``key`` when it cannot be found or imported."""
    if ":" not in name:
        factory = registered(name)
        if factory is None:
            from pfl_mpi.models.config import BUILTIN

            known = registered_names()
            raise ConfigError(
                key,
                f"unknown network {name!r}: built-in {', '.join(BUILTIN)}"
                + (f"; registered by plugins {', '.join(known)}" if known else "")
                + "; or package.module:factory",
            )
        return factory
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(key, f"cannot import {module_name!r} for {name}: {err}") from None
    except Exception as err:  # noqa: BLE001 - a module that fails at import: one line, not a traceback
        raise ConfigError(key, f"importing {module_name!r} failed: {type(err).__name__}: {err}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(key, f"{module_name} has no callable {attr!r}")
    return factory


def options_schema(factory: Callable[..., Any], name: str, key: str = "model.name") -> type[BaseModel]:
    """A pydantic model of the factory's options: its parameters after (input_shape, num_classes)."""
    try:
        signature = inspect.signature(factory, eval_str=True)
    except (NameError, TypeError, SyntaxError):
        signature = inspect.signature(factory)
    params = list(signature.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in params):
        raise ConfigError(key, f"{name} must take (input_shape, num_classes, **options)")
    fields: dict[str, Any] = {}
    for p in params[2:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            continue
        if p.name in RESERVED:
            raise ConfigError(key, f"{name}'s option {p.name!r} would shadow model.{p.name}; rename it")
        annotation = Any if p.annotation is inspect.Parameter.empty else p.annotation
        fields[p.name] = (annotation, ... if p.default is inspect.Parameter.empty else p.default)
    extra = "allow" if any(p.kind == p.VAR_KEYWORD for p in params) else "forbid"
    config = ConfigDict(extra=extra, arbitrary_types_allowed=True)
    return create_model(f"{name} options", __config__=config, **fields)


def resolve_network(spec: ArchitectureConfig, prefix: str = "model") -> tuple[Callable[..., Any], dict[str, Any]]:
    """A user network's factory and its validated options (keyword arguments), or ConfigError naming the key
    under ``prefix``. Built-in networks: (None, {})."""
    if spec.builtin:
        return None, {}
    factory = find_factory(spec.name, f"{prefix}.name")
    schema = options_schema(factory, spec.name, f"{prefix}.name")
    given = spec.options
    try:
        checked = schema.model_validate(given)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join([prefix, *map(str, first["loc"])])
        if first["type"] == "extra_forbidden":
            takes = ", ".join(schema.model_fields) or "no options"
            raise ConfigError(key, f"unknown key: {spec.name} takes {takes}") from None
        raise ConfigError(key, first["msg"].removeprefix("Value error, ")) from None
    options = {k: getattr(checked, k) for k in schema.model_fields}
    options.update(checked.model_extra or {})
    return factory, options


def build_network(spec: ArchitectureConfig, input_shape: tuple[int, ...], num_classes: int) -> Any:
    """Call the user network's factory; ConfigError ``model.name`` when it fails or returns no ``nn.Module``."""
    from torch import nn

    factory, options = resolve_network(spec)
    try:
        model = factory(tuple(input_shape), int(num_classes), **options)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's code failed: one line before MPI, not a traceback per rank
        raise ConfigError(
            "model.name", f"{spec.name}{(tuple(input_shape), num_classes)} failed: {type(err).__name__}: {err}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError("model.name", f"{spec.name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
