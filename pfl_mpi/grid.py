"""The grid of a sweep: configs x ``--set-grid`` values x seeds, one validated task each.

``pfl-mpi slurm`` turns the tasks into a job array, ``pfl-mpi sweep`` runs them on this machine.
Each task is a config file, its ``--set`` overrides and a name (the run file's stem), unique in the
grid: ``<config name>[-<grid value>...][-s<seed>]``.
"""

from __future__ import annotations

import argparse
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

_UNSAFE = re.compile(r"[^A-Za-z0-9_.+=-]")


@dataclass
class Task:
    """One run of a sweep: its config file, the --set overrides, and its name."""

    config: Path
    overrides: list[str]
    name: str
    point: dict[str, str] = field(default_factory=dict)  # the grid's values of this task (key -> --set value)


def split_values(text: str) -> list[str]:
    """``a,b,[1,2]`` -> ``["a", "b", "[1,2]"]``: commas inside brackets or braces do not split."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return [*values, current]


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["algorithm.name=fedavg,ditto", ...]`` -> ``[("algorithm.name", ["fedavg", "ditto"]), ...]``."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        values = [v.strip() for v in split_values(text)]
        if not sep or not key or not all(values):
            raise ConfigError("--set-grid", f"{item!r}: write KEY=VALUE1,VALUE2,... e.g. algorithm.name=fedavg,ditto")
        if key in (k for k, _ in grid):
            raise ConfigError("--set-grid", f"{key} is given twice: list all its values in one --set-grid")
        if len(set(values)) != len(values):
            raise ConfigError("--set-grid", f"{key}: a value is repeated in {text!r}")
        grid.append((key, values))
    return grid


def _label(value: str) -> str:
    """A grid value as part of a file name: ``0.1`` as it is, ``[32,32]`` as ``32_32``."""
    return _UNSAFE.sub("_", value.strip("[]{}'\" ").replace(", ", ",").replace(",", "_"))


def expand(
    configs: list[str],
    overrides: list[str],
    grid: list[tuple[str, list[str]]],
    seeds: list[int],
    *,
    schema_only: bool = False,
) -> list[Task]:
    """Every (config, grid point, seed) task, each validated as ``pfl-mpi run`` would; the data-dependent
    checks run once per config and grid point. ``schema_only``: only what needs neither torch nor the data
    (``config.validate``). Raises ConfigError naming the key at fault."""
    from .config import load_config

    keys = [key for key, _ in grid]
    tasks: list[Task] = []
    for path in configs:
        for point in itertools.product(*(values for _, values in grid)):
            chosen = [f"{key}={value}" for key, value in zip(keys, point, strict=True)]
            for i, seed in enumerate(seeds or [None]):
                task_overrides = [*overrides, *chosen, *([f"seed={seed}"] if seed is not None else [])]
                cfg = load_config(path, task_overrides, schema_only=schema_only)
                if i == 0 and not schema_only:
                    from .data import load_federated
                    from .runtime.build import check_buildable

                    check_buildable(cfg, load_federated(cfg.data, cfg.seed))
                parts = [cfg.name, *(_label(v) for v in point)]
                if len(seeds) > 1:
                    parts.append(f"s{seed}")
                tasks.append(
                    Task(Path(path).resolve(), task_overrides, "-".join(parts), dict(zip(keys, point, strict=True)))
                )
    return number_repeated_names(tasks)


def number_repeated_names(tasks: list[Task]) -> list[Task]:
    """Two configs with one name: the later tasks of a name get -2, -3, ... (in place; returns ``tasks``)."""
    seen: dict[str, int] = {}
    for task in tasks:
        seen[task.name] = seen.get(task.name, 0) + 1
        if seen[task.name] > 1:
            task.name = f"{task.name}-{seen[task.name]}"
    return tasks


def add_grid_arguments(parser: argparse.ArgumentParser, configs_help: str, task: str, note: str = "") -> None:
    """The arguments that name a grid of experiments: CONFIG.yaml..., --set, --set-grid and --seeds (``task``:
    what one point of the grid is called in the help; ``note``: appended to the grid options' help)."""
    parser.add_argument("configs", nargs="+", metavar="CONFIG.yaml", help=configs_help)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=f"override, for every {task}"
    )
    parser.add_argument(
        "--set-grid",
        dest="grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help=f"sweep a key over values{note} (repeatable: every combination), e.g. algorithm.name=fedavg,fedper",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[], metavar="S", help=f"seeds to sweep{note}")
