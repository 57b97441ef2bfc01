"""Runs grouped by configuration, and what differs between the groups.

Runs whose configurations are equal except for ``seed`` (and the keys given with ``--group-by``) form
one group: its curves are the mean over the runs with a +- one sample standard deviation band
(ddof=1), its table row mean +- std and n. Keys that say how or where a run ran, not what it
computed (``IGNORED``), never split groups. ``differences`` lists the keys whose values differ
between groups; ``fairness`` says which of them go beyond the compared key.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import yaml

from .load import Run

IGNORED = ("name", "output", "threads", "device", "plugins", "comm.wait", "comm.poll_max_ms")
AVERAGED = ("seed",)
MISSING = "-"  # a key one group's configuration does not have (another algorithm's parameter)
LEGEND_KEYS = 3  # without --by, legends name the groups by the differing keys when there are at most this many


def flat_config(run: Run) -> dict[str, str]:
    """The run's configuration (the ``config`` attribute) as dotted key -> JSON text of the value."""
    text = run.attrs.get("config")
    raw = yaml.safe_load(str(text)) if text else {}
    out: dict[str, str] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = json.dumps(value, sort_keys=True)

    walk(raw if isinstance(raw, dict) else {}, "")
    return out


def shown(value: str) -> str:
    """A flat value for people: strings without quotes, the rest as JSON."""
    if value == MISSING:
        return value
    loaded = json.loads(value)
    return loaded if isinstance(loaded, str) else value


@dataclass
class Group:
    """Runs of one configuration (up to the averaged keys), and its legend entry."""

    runs: list[Run]
    config: dict[str, str]  # the keys that identify the group
    legend: str = ""
    members: dict[str, list[str]] = field(default_factory=dict)  # averaged key -> values of the runs

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[str]:
        return self.members.get("seed", [])


def group_runs(runs: list[Run], group_by: list[str] = ()) -> list[Group]:
    """Runs with equal configurations, seed and ``group_by`` keys aside, in order of first appearance.
    A run without a stored configuration is a group of its own."""
    averaged = set(AVERAGED) | set(group_by)
    groups: dict[object, Group] = {}
    for i, run in enumerate(runs):
        flat = flat_config(run)
        config = {k: v for k, v in flat.items() if k not in averaged and not _ignored(k)}
        key = tuple(sorted(config.items())) if flat else ("no config", i)
        group = groups.setdefault(key, Group([], config))
        group.runs.append(run)
        for name in sorted(averaged):
            group.members.setdefault(name, []).append(shown(flat.get(name, MISSING)))
    return list(groups.values())


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in IGNORED)


def known_keys(runs: list[Run]) -> set[str]:
    """Every dotted key of the runs' configurations, and every section prefix of them."""
    keys = set()
    for run in runs:
        for key in flat_config(run):
            parts = key.split(".")
            keys.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return keys


def differences(groups: list[Group]) -> dict[str, list[str]]:
    """Config keys whose values differ between groups -> each group's value (``MISSING`` if it has none)."""
    keys = sorted(set().union(*(g.config for g in groups))) if groups else []
    out = {}
    for key in keys:
        values = [g.config.get(key, MISSING) for g in groups]
        if len(set(values)) > 1:
            out[key] = values
    return out


def _consequence(key: str, values: list[str], diffs: dict[str, list[str]]) -> bool:
    """A parameter that only some of the compared algorithms have: it differs because the algorithm does."""
    return key.startswith("algorithm.") and "algorithm.name" in diffs and MISSING in values


def fairness(diffs: dict[str, list[str]], by: list[str]) -> tuple[list[str], list[str]]:
    """(the compared keys, the other keys that differ). Without ``by``, a single differing key is the
    compared one; parameters that exist for only some of the compared algorithms are not counted."""
    real = [k for k, v in diffs.items() if not _consequence(k, v, diffs)]
    compared = [k for k in real if _matches(k, by)] if by else (real if len(real) == 1 else [])
    return compared, [k for k in real if k not in compared]


def _matches(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def name_groups(groups: list[Group], by: list[str], diffs: dict[str, list[str]]) -> None:
    """Legend entries: ``key=value`` of the ``by`` keys (without ``by``: of the differing keys, when at
    most ``LEGEND_KEYS``; the algorithm by its name alone), else the runs' name and algorithm;
    ``(n=...)`` for groups of several runs; unique."""
    if by:
        keys = [k for k in diffs if _matches(k, by)] or list(by)
    else:  # the differing keys, if few enough to read (the fairness warning says when there is more than one)
        real = [k for k, v in diffs.items() if not _consequence(k, v, diffs)]
        keys = real if len(real) <= LEGEND_KEYS else []
    for group in groups:
        if keys:
            values = [shown(group.config.get(k, MISSING)) for k in keys]
            pairs = [v if k == "algorithm.name" else f"{k}={v}" for k, v in zip(keys, values, strict=True)]
            label = ", ".join(pairs)
        else:
            label = group.runs[0].label
        group.legend = label
    counts = Counter(g.legend for g in groups)
    for i, group in enumerate(groups):
        if counts[group.legend] > 1:
            group.legend = f"{group.legend} [{i + 1}]"
        if group.n > 1:
            group.legend = f"{group.legend} (n={group.n})"


def series(values: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per round over runs: (mean, sample std, count) of ``values`` (one [R_i] array per run, NaN where
    missing; runs of different lengths are padded with NaN). std is NaN where fewer than 2 values."""
    length = max((len(v) for v in values), default=0)
    table = np.full((len(values), length), np.nan)
    for i, v in enumerate(values):
        table[i, : len(v)] = v
    count = np.sum(~np.isnan(table), axis=0)
    total = np.nansum(table, axis=0)
    mean = np.divide(total, count, out=np.full(length, np.nan), where=count > 0)
    sq = np.nansum((table - mean) ** 2, axis=0)
    std = np.divide(sq, count - 1, out=np.full(length, np.nan), where=count > 1) ** 0.5
    return mean, std, count


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; NaN for fewer than 2) and count of the non-NaN values."""
    x = np.array([v for v in values if v is not None and not np.isnan(v)], dtype=np.float64)
    if not len(x):
        return float("nan"), float("nan"), 0
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else float("nan"), len(x)
