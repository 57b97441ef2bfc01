"""The runtime: the round loop, client placement and state, device binding, progress."""

from .engine import EXIT_DIVERGED, Engine

__all__ = ["EXIT_DIVERGED", "Engine"]
