"""A network's declared split: which parameters form its head, and what happens to its buffers.

The head is declared, never guessed: ``model.head`` (parameter-name prefixes, attached to the built module) or
the module's own ``head_prefixes()`` method (the built-in networks: ``("head",)``). A prefix ``p`` selects the
parameter ``p`` and every name under it (``p.weight``, ``p.0.bias``, ...), never ``p2.weight``.

Buffers (``model.buffers``): the persistent buffers of the module (its state_dict entries that are not
parameters, e.g. BatchNorm's running mean and variance) join the flat layouts (``split_names``): ``shared``
treats them like parameters of their name, ``personal`` makes all of them client state, ``refuse`` refuses a
network that has any.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pfl_mpi.errors import ConfigError

HEAD_ATTR = "_pfl_head"  # the prefixes of model.head, set on the built module
BUFFERS_ATTR = "_pfl_buffers"  # model.buffers, set on the built module


def declare(model: nn.Module, head: Sequence[str] | None, buffers: str) -> None:
    """Attach the model section's ``head`` (None: the module's own ``head_prefixes()``) and ``buffers`` policy."""
    if head is not None:
        object.__setattr__(model, HEAD_ATTR, tuple(p.removesuffix(".") for p in head))
    object.__setattr__(model, BUFFERS_ATTR, buffers)


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The declared head of ``model``; ConfigError ``model.head`` when it declares none (or an empty one)."""
    prefixes = getattr(model, HEAD_ATTR, None)
    if prefixes is None and callable(getattr(model, "head_prefixes", None)):
        prefixes = tuple(str(p).removesuffix(".") for p in model.head_prefixes())
    if prefixes is None:
        raise ConfigError(
            "model.head",
            f"{type(model).__name__} declares no head: set model.head to parameter-name prefixes (e.g. [fc]) "
            "or give the module a head_prefixes() method",
        )
    if not prefixes:
        raise ConfigError("model.head", f"{type(model).__name__}.head_prefixes() is empty")
    return prefixes


def under(name: str, prefix: str) -> bool:
    """Whether ``name`` is ``prefix`` or a name inside it (``fc`` covers ``fc.weight``, not ``fc2.weight``)."""
    return name == prefix or name.startswith(prefix + ".")


def in_head(model: nn.Module, name: str) -> bool:
    """Whether the parameter (or buffer) ``name`` of ``model`` belongs to its declared head."""
    return any(under(name, p) for p in head_prefixes(model))


def check_head(model: nn.Module, key: str = "model.head") -> None:
    """Every declared prefix (``model.head`` or ``head_prefixes()``) must select at least one parameter; a
    network that declares no head passes (an algorithm that needs one refuses it)."""
    if getattr(model, HEAD_ATTR, None) is None and not callable(getattr(model, "head_prefixes", None)):
        return
    prefixes = head_prefixes(model)
    names = [n for n, _ in model.named_parameters()]
    for p in prefixes:
        if not any(under(n, p) for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise ConfigError(key, f"{p!r} selects no parameter of {type(model).__name__} (it has {', '.join(tops)})")


def buffer_names(model: nn.Module) -> list[str]:
    """The persistent buffers of ``model`` (in its state_dict), in ``named_buffers`` order."""
    persistent = set(model.state_dict(keep_vars=True))
    return [n for n, _ in model.named_buffers() if n in persistent]


def buffer_policy(model: nn.Module) -> str:
    """``model.buffers`` of the section that built ``model`` (``shared`` for a module built otherwise)."""
    return getattr(model, BUFFERS_ATTR, "shared")


def check_buffers(model: nn.Module, key: str = "model.buffers") -> None:
    """Refuse a network with buffers under ``model.buffers: refuse``."""
    names = buffer_names(model)
    if names and buffer_policy(model) == "refuse":
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ConfigError(key, f"{type(model).__name__} has {len(names)} buffers ({shown}) and model.buffers is refuse")


def require_base_head(models: Sequence[nn.Module], algorithm: str) -> None:
    """Algorithms that work on the feature embedding (FedProto, FedGKT, FedGen) need ``base`` and ``head``
    modules with ``forward = head(base(x))`` and ``feature_dim``, as the built-in networks have."""
    for m in models:
        if not all(isinstance(getattr(m, a, None), nn.Module) for a in ("base", "head")) or not hasattr(
            m, "feature_dim"
        ):
            raise ConfigError(
                "model.name",
                f"{algorithm} needs a network with base and head modules and feature_dim (forward = "
                f"head(base(x))); {type(m).__name__} has not",
            )


# algorithms whose whole model state goes through ``split_names``' layouts (the shared vector and the
# personal client state), so buffers there move, average or stay exactly like parameters; a plugin
# algorithm declares the same with a class attribute ``handles_buffers = True``
BUFFER_ALGORITHMS = ("fedavg", "fedper", "lgfedavg")


def check_buffers_handled(cls: type, models: Sequence[nn.Module]) -> None:
    """Refuse a network with buffers under an algorithm that would drop them (one line naming model.buffers)."""
    if getattr(cls, "handles_buffers", cls.name in BUFFER_ALGORITHMS):
        return
    for m in models:
        names = buffer_names(m)
        if names:
            raise ConfigError(
                "model.buffers",
                f"{cls.name} does not handle buffers and {type(m).__name__} has {len(names)} ({names[0]}, ...): "
                f"use a network without them (GroupNorm instead of BatchNorm) or {', '.join(BUFFER_ALGORITHMS)}",
            )
