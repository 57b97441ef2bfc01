"""The run configuration: schema, YAML loading, ``--set`` overrides and one-line validation errors.

Each subsystem owns the schema of its section (data, model, train, algorithm); this module
composes them. :func:`load_config` returns a validated :class:`RunConfig` or raises
:class:`~pfl_mpi.errors.ConfigError` naming the offending key.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .comm.world import POLL_MAX_MS
from .data import DataConfig
from .errors import ConfigError
from .models import ModelConfig
from .network import NetworkConfig
from .runtime.novel_config import NovelConfig, check_novel
from .training.config import TrainConfig

NAME_MAX = 100  # characters of a run name


class CommConfig(BaseModel):
    """How ranks wait for messages."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")
    wait: Literal["polled", "blocking"] = Field(
        "polled",
        description="polled: a waiting rank sleeps between polls (frees its core for the others; it notices "
        "completion up to poll_max_ms late); blocking: MPI's own wait (busy-polls a core; lowest latency)",
    )
    poll_max_ms: float = Field(
        POLL_MAX_MS, gt=0, description="polled wait: longest sleep between polls of a pending collective (ms)"
    )


class RunConfig(BaseModel):
    """One experiment. Every field can be set in YAML or with ``--set key.sub=value``."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    name: str = Field(
        "run",
        min_length=1,
        max_length=NAME_MAX,
        description="run name (not a path); the default output is runs/<name>.h5",
    )
    seed: int = Field(0, ge=0, lt=2**63, description="root of every random choice (data, sampling, init, client RNG)")
    rounds: int = Field(20, ge=1, description="communication rounds")
    clients_per_round: int | None = Field(10, ge=1, description="clients sampled per round; null = all")
    eval_every: int = Field(1, ge=1, description="evaluate every k rounds (and after the last round)")
    finetune_epochs: int = Field(
        0, ge=0, description="after the last round, each client fine-tunes the model it uses for this many epochs"
    )
    state_every: int = Field(10, ge=0, description="snapshot client and global state every k rounds; 0 = last only")
    threads: int = Field(1, ge=1, description="torch threads per rank")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: a GPU by node-local rank if any")
    output: str | None = Field(None, description="HDF5 run file; default runs/<name>.h5")
    plugins: list[str] = Field(
        default_factory=list,
        description="imported on every rank (own algorithms): module names, or paths to .py files "
        "(relative to the config file's directory; to the working directory for --set)",
    )
    task: Literal["auto", "classification", "next_token", "regression"] = Field(
        "auto",
        description="what the model predicts, its default loss and its metrics (docs/tasks.md); auto: next_token "
        "for shakespeare, classification otherwise",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    algorithm: dict[str, Any] = Field(default_factory=lambda: {"name": "fedavg"})
    comm: CommConfig = Field(default_factory=CommConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    novel: NovelConfig = Field(default_factory=NovelConfig, description="serving novel clients (data.novel_clients)")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        """A name names the run (and its default file runs/<name>.h5); it is never a path."""
        if any(not c.isprintable() for c in name):
            raise ValueError("only printable characters (no NUL, tab or newline)")
        if "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"{name!r} is a path, not a name (no / or \\, no leading '.'); use --out for the file")
        return name

    @field_validator("algorithm", mode="before")
    @classmethod
    def _default_algorithm(cls, section: Any) -> Any:
        """Setting only ``algorithm.<param>`` keeps the default algorithm."""
        return {"name": "fedavg", **section} if isinstance(section, dict) and "name" not in section else section

    @property
    def sampled_per_round(self) -> int:
        return self.data.num_clients if self.clients_per_round is None else self.clients_per_round

    @property
    def output_path(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / f"{self.name}.h5"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(text, "an override is written key=value, e.g. --set train.lr=0.1")
    key = key.strip()
    if "!!python" in value or "!python" in value:
        raise ConfigError(key, f"python tags are not allowed in values ({value.strip()!r})")
    try:
        return key.split("."), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ConfigError(key, f"the value {value!r} is not valid YAML ({_yaml_reason(err)})") from None


def _yaml_reason(err: yaml.YAMLError) -> str:
    """What a YAML parser disliked, in one short phrase."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem:
        return f"{problem}, line {mark.line + 1} column {mark.column + 1}" if mark else str(problem)
    return " ".join(str(err).split())


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted ``key=value`` of ``overrides`` in the nested dict ``raw`` (in place)."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(path[: i + 1]), "is not a section, cannot set a key inside it")
            node = child
        node[path[-1]] = value
    return raw


def _first_error(err: ValidationError) -> ConfigError:
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    return ConfigError(key, message)


def _is_path(entry: str) -> bool:
    return entry.endswith(".py") or "/" in entry or "\\" in entry


def _absolute_plugins(entries: list, base: Path) -> list:
    """``plugins`` entries with their relative file paths made absolute against ``base``."""
    return [
        str(base / p) if isinstance(p, str) and _is_path(p) and not Path(p).expanduser().is_absolute() else p
        for p in entries
    ]


def _not_found(entry: str, why: object) -> ConfigError:
    """A module name that is not importable; says how to name a file of that name in the working directory."""
    hint = f" (the working directory is not searched: give the file, ./{entry}.py)"
    return ConfigError("plugins", f"cannot import {entry!r}: {why}{hint if Path(f'{entry}.py').is_file() else ''}")


def import_plugin(entry: str, base: Path | None = None) -> str:
    """Import one ``plugins`` entry and return how the configuration keeps it.

    A path to a .py file (``load_config`` makes a config file's relative paths absolute against its
    directory, and those given by ``--set`` against the working directory) is imported from that file
    and kept as an absolute path. A module name is imported from sys.path; failing that,
    from ``base``, and then kept as the file's absolute path, so that a resume finds it from anywhere.
    The working directory is not searched (``python -m pfl_mpi`` removes it from sys.path)."""
    if _is_path(entry):
        path = (base or Path.cwd()) / Path(entry).expanduser()
        if not path.is_file():
            raise ConfigError("plugins", f"no such plugin file: {path}")
        _import_file(path.resolve())
        return str(path.resolve())
    try:
        importlib.import_module(entry)
        return entry
    except ImportError as err:
        beside = base / f"{entry}.py" if base else None
        if beside is None or not beside.is_file() or err.name != entry:
            raise _not_found(entry, err) from None
        _import_file(beside.resolve())
        return str(beside.resolve())
    except Exception as err:  # noqa: BLE001 - a plugin that fails at import: one line, not a traceback
        raise ConfigError("plugins", f"importing {entry!r} failed: {type(err).__name__}: {err}") from None


def find_plugin(entry: str, base: Path | None = None) -> str:
    """Find one ``plugins`` entry without importing it and return how the configuration keeps it (as
    :func:`import_plugin` would, for a module found on sys.path or beside the config)."""
    if _is_path(entry):
        path = (base or Path.cwd()) / Path(entry).expanduser()
        if not path.is_file():
            raise ConfigError("plugins", f"no such plugin file: {path}")
        return str(path.resolve())
    try:
        found = importlib.util.find_spec(entry)
    except (ImportError, ValueError):
        found = None
    if found is not None:
        return entry
    beside = base / f"{entry}.py" if base else None
    if beside is None or not beside.is_file():
        raise _not_found(entry, f"no module named {entry!r}")
    return str(beside.resolve())


def _import_file(path: Path) -> None:
    """Import the module in ``path`` under its file name (once)."""
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError("plugins", f"cannot import {path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - one line, not a traceback
        del sys.modules[name]
        raise ConfigError("plugins", f"importing {path} failed: {type(err).__name__}: {err}") from None


def validate(raw: dict[str, Any], base: Path | None = None, *, schema_only: bool = False) -> RunConfig:
    """Validate a nested dict: the schema, then the plugins and the algorithm's own parameters.

    ``base``: the config file's directory, where relative plugin paths (and plugin modules not on sys.path)
    are looked for. ``schema_only``: check the schema and that each plugin can be found, but import no
    plugin and leave the ``algorithm`` section unchecked (its parameters live with the algorithms, which
    import torch); ``pfl-mpi slurm`` writes a script this way."""
    if not isinstance(raw, dict):
        raise ConfigError("(top level)", "the configuration must be a mapping of keys to values")
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise _first_error(err) from None
    if cfg.clients_per_round is not None and cfg.clients_per_round > cfg.data.num_clients:
        raise ConfigError(
            "clients_per_round",
            f"{cfg.clients_per_round} exceeds the {cfg.data.num_clients} clients (data.num_clients)",
        )
    if schema_only:
        cfg.plugins = [find_plugin(entry, base) for entry in cfg.plugins]
        _check_architectures(cfg, None)
        check_novel(cfg, None)
        return cfg
    from .algorithms import resolve

    cfg.plugins = [import_plugin(entry, base) for entry in cfg.plugins]
    cls, params = resolve(cfg.algorithm)
    cfg.algorithm = {"name": cls.name, **params.model_dump(mode="json")}
    _check_architectures(cfg, cls)
    check_novel(cfg, cls)  # data.novel_clients: a count that leaves clients to train, an algorithm that serves them
    from .training.task_checks import check_task

    check_task(cfg, cls)  # task, train.loss (imported after the plugins) and train.optimizer_state
    cfg.model.check_networks()  # user networks: their factories (imported after the plugins) and options
    return cfg


def _check_architectures(cfg: RunConfig, cls) -> None:
    """Several architectures need an algorithm that supports heterogeneous clients (``cls``; None: not
    checked), and a client for each."""
    groups = len(cfg.model.architectures)
    if groups > 1 and cls is not None and not cls.heterogeneous:
        raise ConfigError(
            "model.architectures",
            f"{groups} architectures, but {cls.name} needs one model for every client "
            "(it does not support heterogeneous clients)",
        )
    if groups > cfg.data.num_clients:
        raise ConfigError(
            "model.architectures", f"{groups} architectures for {cfg.data.num_clients} clients (data.num_clients)"
        )


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file (empty file: empty mapping)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError("config", f"cannot read {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError("config", f"{path} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError("config", f"{path} is not valid YAML: {_yaml_reason(err)}") from None
    return {} if raw is None else raw


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, schema_only: bool = False
) -> RunConfig:
    """Read ``path`` (or the defaults), apply ``overrides``, validate (``schema_only``: see :func:`validate`)."""
    raw = read_yaml(path) if path else {}
    if not isinstance(raw, dict):
        raise ConfigError("config", f"{path} must hold a mapping of keys to values")
    base = Path(path).resolve().parent if path else None
    if base is not None and isinstance(raw.get("plugins"), list):  # the file's own entries: relative to it
        raw["plugins"] = _absolute_plugins(raw["plugins"], base)
    raw = apply_overrides(raw, overrides or [])
    if isinstance(raw.get("plugins"), list):  # --set plugins=[...]: relative to the working directory
        raw["plugins"] = _absolute_plugins(raw["plugins"], Path.cwd())
    return validate(raw, base, schema_only=schema_only)
