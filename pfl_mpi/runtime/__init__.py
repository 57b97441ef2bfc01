"""The runtime: the round loop, client placement and state, device binding, progress.

``Engine`` is imported lazily, so that the small modules here (placement, device, cluster) can be used
without importing the engine and, through it, every algorithm.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EXIT_DIVERGED", "Engine"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
