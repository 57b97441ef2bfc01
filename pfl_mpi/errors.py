"""Errors the user can act on. Each names what is wrong in one line."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid. ``key`` is its dotted path, e.g. ``data.classes_per_client``."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class DivergenceError(RuntimeError):
    """A loss or an aggregate became NaN or infinite; the completed rounds are kept."""
