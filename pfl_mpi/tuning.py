"""Hyper-parameter tuning on the validation split: each algorithm's declared grid, and the choice of its best point.

An algorithm declares what to tune next to its Params, as ``tuning_grid`` (config key -> values; every key
``algorithm.<a Params field>`` or ``train.<a train key it uses>``). ``pfl-mpi sweep --tune`` runs that grid
(with ``data.eval_on: [val, test]``) through the sweep machinery, then :func:`choose` reads every run file
and picks the point whose runs score best on the validation metric (mean over seeds); the test metric is
recorded beside it and never looked at for the choice. The record goes to RUNS_DIR/tuning.json
(docs/tuning.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

TUNING_TRIALS = 4  # points in every built-in algorithm's grid: the same tuning budget for each (docs/tuning.md)
SELECT_ON = "val_acc"
EVAL_ON_BOTH = "data.eval_on=[val,test]"
_MINIMISED = ("loss", "mse", "mae")


def as_set_value(value: Any) -> str:
    """A grid value as a ``--set`` value: JSON, which the config's YAML reads back as the same value."""
    return json.dumps(value)


def check_tuning_grid(cls: type) -> list[tuple[str, list[str]]]:
    """``cls.tuning_grid`` checked (keys name a Params field or a train key the algorithm uses; each key has
    distinct, valid values) and returned as ``--set-grid`` items. Raises ConfigError naming the bad entry."""
    from pydantic import ValidationError

    from .training.config import TrainConfig

    where = f"{cls.name}.tuning_grid"
    grid = getattr(cls, "tuning_grid", None)
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(where, "declare it as {config key: [values, ...]}, e.g. {'train.lr': [0.01, 0.1]}")
    params = {name: f for name, f in cls.Params.model_fields.items()}
    aliases = {f.alias: name for name, f in params.items() if f.alias}
    items: list[tuple[str, list[str]]] = []
    for key, values in grid.items():
        section, _, name = str(key).partition(".")
        if section == "algorithm" and name in (*params, *aliases) and name != "name":
            field_name = aliases.get(name, name)
            model = cls.Params
        elif section == "train" and name in TrainConfig.model_fields and name not in cls.replaces_train:
            field_name, model = name, TrainConfig
        elif section == "train" and name in cls.replaces_train:
            raise ConfigError(where, f"{key}: {cls.name} does not use it; tune {cls.replaces_train[name]}")
        else:
            known = ", ".join(f"algorithm.{params[n].alias or n}" for n in params) or "none"
            raise ConfigError(where, f"{key}: not a key to tune (algorithm parameters: {known}; or train.<key>)")
        if not isinstance(values, list) or not values:
            raise ConfigError(where, f"{key}: give a non-empty list of values, not {values!r}")
        texts = [as_set_value(v) for v in values]
        if len(set(texts)) != len(texts):
            raise ConfigError(where, f"{key}: a value is repeated in {values}")
        for value in values:
            try:
                model.model_validate({field_name: value})
            except ValidationError as err:
                raise ConfigError(where, f"{key}={value!r}: {err.errors()[0]['msg']}") from None
        items.append((str(key), texts))
    return items


def tuning_grid_for(config: str | Path, overrides: list[str]) -> list[tuple[str, list[str]]]:
    """The checked tuning grid of the algorithm that ``config`` (with ``overrides``) runs."""
    from .algorithms import resolve
    from .config import load_config

    cls, _ = resolve(load_config(config, overrides).algorithm)
    return check_tuning_grid(cls)


def merge_grids(
    declared: list[tuple[str, list[str]]], given: list[tuple[str, list[str]]]
) -> list[tuple[str, list[str]]]:
    """The declared grid with the user's ``--set-grid`` keys: a key given replaces the declared values, a new
    key is added (every combination)."""
    mine = dict(given)
    merged = [(key, mine.pop(key, values)) for key, values in declared]
    return merged + [(key, values) for key, values in given if key in mine]


def eval_overrides(overrides: list[str]) -> list[str]:
    """``overrides`` with ``data.eval_on=[val,test]`` unless they already say what is evaluated."""
    keys = {o.partition("=")[0].strip() for o in overrides}
    return overrides if keys & {"data.eval_on", "data.eval_split"} else [*overrides, EVAL_ON_BOTH]


@dataclass
class Trial:
    """One grid point of a tuning sweep: its values, run files and their final metrics (mean over seeds)."""

    point: dict[str, str]
    runs: list[str]
    score: float = math.nan  # the selection metric; NaN: a run failed, diverged or did not record it
    test: float = math.nan  # the test metric of the same rounds: recorded, not used for the choice
    notes: list[str] = field(default_factory=list)


def minimised(metric: str) -> bool:
    """Whether smaller is better for ``metric`` (losses and errors)."""
    return metric.endswith(_MINIMISED)


def final_metric(path: Path, metric: str) -> tuple[float, str]:
    """The value of ``metric`` after the last round of a completed run (NaN and why, otherwise)."""
    import numpy as np

    from .store import read_summary

    try:
        summary = read_summary(path)
    except (OSError, ValueError, KeyError) as err:
        return math.nan, f"{path.name}: not readable ({err})"
    status = str(summary.attrs.get("status"))
    if status != "completed":
        return math.nan, f"{path.name}: {status}"
    if metric not in summary.rounds:
        return math.nan, f"{path.name}: no {metric} recorded (data.eval_on must include its split)"
    values = np.asarray(summary.rounds[metric], dtype=float)
    finite = values[np.isfinite(values)]
    return (float(finite[-1]), "") if finite.size else (math.nan, f"{path.name}: {metric} never finite")


def score_trials(points: list[tuple[dict[str, str], list[Path]]], metric: str = SELECT_ON) -> list[Trial]:
    """Every point's mean final ``metric`` over its runs, and the test metric of the same runs."""
    test_metric = "test_" + metric.partition("_")[2]
    trials = []
    for point, files in points:
        trial = Trial(point, [f.stem for f in files])
        scores, tests = [], []
        for path in files:
            value, why = final_metric(path, metric)
            scores.append(value)
            tests.append(final_metric(path, test_metric)[0])
            if why:
                trial.notes.append(why)
        trial.score = sum(scores) / len(scores) if scores else math.nan
        trial.test = sum(tests) / len(tests) if tests else math.nan
        trials.append(trial)
    return trials


def choose(trials: list[Trial], metric: str = SELECT_ON) -> Trial:
    """The trial with the best validation score (highest, or lowest for a loss); ties go to the earlier point.
    Raises ValueError when no trial has a score."""
    scored = [t for t in trials if math.isfinite(t.score)]
    if not scored:
        raise ValueError(f"no trial recorded a final {metric}: " + "; ".join(n for t in trials for n in t.notes))
    sign = 1.0 if minimised(metric) else -1.0
    return min(scored, key=lambda t: sign * t.score)


def record(config: str, metric: str, trials: list[Trial], best: Trial) -> dict[str, Any]:
    """What tuning.json keeps for one config: the grid's trials, the chosen point and its ``--set`` lines."""
    return {
        "config": config,
        "metric": metric,
        "trials": [asdict(t) for t in trials],
        "best": best.point,
        "best_score": best.score,
        "set": [f"{k}={v}" for k, v in best.point.items()],
    }


def write_record(path: Path, records: dict[str, dict[str, Any]]) -> None:
    """RUNS_DIR/tuning.json: one record per tuned config (by its run name), merged with what the file held."""
    held = json.loads(path.read_text()) if path.exists() else {}
    held.update(records)
    path.write_text(json.dumps(held, indent=1, allow_nan=True) + "\n")
