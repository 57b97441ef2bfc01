"""The run configuration: defaults, YAML + --set overrides, errors that name the key, plugins."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml

from pfl_mpi.algorithms import algorithm_names
from pfl_mpi.config import RunConfig, apply_overrides, load_config, parse_override, validate
from pfl_mpi.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _error(overrides: list[str], path: Path | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value


# -- defaults and sources ---------------------------------------------------------------------


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.rounds == 20 and cfg.seed == 0 and cfg.clients_per_round == 10
    assert cfg.data.name == "digits" and cfg.data.num_clients == 100
    # the algorithm section is completed with the algorithm's own defaults
    assert cfg.algorithm["name"] == "fedavg"
    assert cfg.algorithm["weighting"] == "samples"
    assert cfg.algorithm["server_opt"]["name"] == "sgd" and cfg.algorithm["server_opt"]["lr"] == 1.0
    assert cfg.output_path == Path("runs") / "run.h5"
    assert cfg.sampled_per_round == 10


def test_to_yaml_round_trips():
    cfg = load_config(None, ["algorithm.name=fedper", "train.lr=0.2", "clients_per_round=null"])
    again = validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.sampled_per_round == again.data.num_clients


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "name: exp\nrounds: 3\ndata:\n  num_clients: 12\n  name: digits\ntrain:\n  lr: 0.1\n  batch_size: 8\n"
        "algorithm:\n  name: fedper\n",
        encoding="utf-8",
    )
    cfg = load_config(
        path,
        [
            "train.lr=0.5",  # float
            "rounds=5",  # int
            "data.stratify=false",  # bool
            "clients_per_round=null",  # None
            "model.hidden=[4, 5]",  # list
            "data.synthetic.alpha=0.25",  # nested two levels down
            "output=out/x.h5",
        ],
    )
    assert cfg.name == "exp"  # from the file
    assert cfg.train.batch_size == 8  # from the file, untouched by overrides
    assert cfg.train.lr == 0.5 and isinstance(cfg.train.lr, float)
    assert cfg.rounds == 5
    assert cfg.data.stratify is False
    assert cfg.clients_per_round is None and cfg.sampled_per_round == 12
    assert cfg.model.hidden == [4, 5]
    assert cfg.data.synthetic.alpha == 0.25
    assert cfg.algorithm["name"] == "fedper"
    assert cfg.output_path == Path("out/x.h5")


def test_empty_yaml_file_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert load_config(path) == load_config()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.algorithm["name"] in algorithm_names()


def test_parse_override_types():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=0.5") == (["a"], 0.5)
    assert parse_override("a=yes") == (["a"], True)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a = text") == (["a"], "text")
    assert parse_override("a=x=y") == (["a"], "x=y")


def test_apply_overrides_nested_in_place():
    raw = {"train": {"lr": 0.1}}
    out = apply_overrides(raw, ["train.batch_size=4", "data.synthetic.beta=2"])
    assert out is raw
    assert raw == {"train": {"lr": 0.1, "batch_size": 4}, "data": {"synthetic": {"beta": 2}}}


# -- errors name the key ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,key",
    [
        ("bogus=1", "bogus"),
        ("train.lrr=0.1", "train.lrr"),
        ("data.foo=1", "data.foo"),
        ("data.synthetic.gamma=1", "data.synthetic.gamma"),
        ("comm.poll=1", "comm.poll"),
    ],
)
def test_unknown_key_is_named(override, key):
    err = _error([override])
    assert err.key == key
    assert str(err).startswith(f"{key}: ")
    assert "\n" not in str(err)


@pytest.mark.parametrize(
    "override,key",
    [
        ("rounds=abc", "rounds"),
        ("rounds=0", "rounds"),
        ("seed=-1", "seed"),
        ("train.lr=fast", "train.lr"),
        ("train.lr=-0.1", "train.lr"),
        ("data.num_clients=many", "data.num_clients"),
        ("clients_per_round=abc", "clients_per_round"),
        ("device=tpu", "device"),
        ("data.name=imagenet", "data.name"),
        ("model.name=resnet", "model.name"),
        ("train=3", "train"),
        ("comm.wait=spin", "comm.wait"),
        ("comm.poll_max_ms=0", "comm.poll_max_ms"),
    ],
)
def test_wrong_type_or_value_is_named(override, key):
    err = _error([override])
    assert err.key == key
    assert "\n" not in str(err)


def test_override_inside_a_value_is_rejected(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("rounds: 3\n", encoding="utf-8")
    err = _error(["rounds.x=1"], path)
    assert err.key == "rounds"


def test_override_without_equals_names_it():
    err = _error(["train.lr"])
    assert err.key == "train.lr"
    assert "key=value" in err.message


def test_unknown_algorithm():
    err = _error(["algorithm.name=nope"])
    assert err.key == "algorithm.name"
    assert "'nope'" in err.message
    for known in ("fedavg", "fedper", "local"):
        assert known in err.message


@pytest.mark.parametrize(
    "override,key",
    [
        ("algorithm.server_opt.lr=-1", "algorithm.server_opt.lr"),
        ("algorithm.weighting=bogus", "algorithm.weighting"),
        ("algorithm.server_opt.name=lamb", "algorithm.server_opt.name"),
        ("algorithm.colour=red", "algorithm.colour"),
    ],
)
def test_bad_algorithm_param_is_named(override, key):
    err = _error(["algorithm.name=fedavg", override])
    assert err.key == key


@pytest.mark.parametrize(
    "override,key",
    [
        ("algorithm.server_opt.lr=-1", "algorithm.server_opt.lr"),
        ("algorithm.weighting=bogus", "algorithm.weighting"),
    ],
)
def test_bad_algorithm_param_is_named_with_default_algorithm(override, key):
    """Setting one algorithm parameter must not forget the default algorithm (fedavg)."""
    err = _error([override])
    assert err.key == key


def test_algorithm_param_override_keeps_default_algorithm():
    cfg = load_config(None, ["algorithm.weighting=uniform"])
    assert cfg.algorithm["name"] == "fedavg"
    assert cfg.algorithm["weighting"] == "uniform"


def test_algorithm_param_accepted():
    cfg = load_config(None, ["algorithm.name=fedavg", "algorithm.server_opt.name=adam", "algorithm.server_opt.lr=0.01"])
    assert cfg.algorithm["server_opt"]["name"] == "adam"
    assert cfg.algorithm["server_opt"]["lr"] == 0.01
    assert cfg.algorithm["weighting"] == "samples"


def test_local_takes_no_params():
    err = _error(["algorithm.name=local", "algorithm.weighting=uniform"])
    assert err.key == "algorithm.weighting"


def test_clients_per_round_above_num_clients():
    err = _error(["data.num_clients=8", "clients_per_round=9"])
    assert "clients_per_round" in str(err)
    assert "\n" not in str(err)
    # equal is fine, and null means all
    assert load_config(None, ["data.num_clients=8", "clients_per_round=8"]).sampled_per_round == 8
    assert load_config(None, ["data.num_clients=8", "clients_per_round=null"]).sampled_per_round == 8


def test_clients_per_round_error_key_is_a_dotted_path():
    """ConfigError.key is documented as the dotted path of the offending value."""
    err = _error(["data.num_clients=8", "clients_per_round=9"])
    assert err.key == "clients_per_round"


def test_missing_config_file(tmp_path):
    err = _error([], tmp_path / "nope.yaml")
    assert err.key == "config"
    assert "nope.yaml" in err.message


def test_config_file_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n", encoding="utf-8")
    assert _error([], path).key == "config"


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rounds: [1, 2\n", encoding="utf-8")
    err = _error([], path)
    assert err.key == "config"
    assert "\n" not in str(err)


def test_validate_rejects_non_mapping():
    with pytest.raises(ConfigError) as info:
        validate([1, 2])  # type: ignore[arg-type]
    assert info.value.key == "(top level)"


# -- plugins ----------------------------------------------------------------------------------


def test_plugin_that_cannot_be_imported():
    name = f"no_such_module_{uuid.uuid4().hex}"
    err = _error([f"plugins=[{name}]"])
    assert err.key == "plugins"
    assert name in err.message


def test_plugin_registers_an_algorithm(tmp_path, monkeypatch):
    tag = uuid.uuid4().hex[:12]
    module, algo = f"plugin_{tag}", f"mine_{tag}"
    (tmp_path / f"{module}.py").write_text(
        "from pydantic import BaseModel, ConfigDict\n"
        "from pfl_mpi.algorithms import register\n"
        "from pfl_mpi.algorithms.fedavg import FedAvg\n\n"
        "class Params(BaseModel):\n"
        "    model_config = ConfigDict(extra='forbid')\n"
        "    mu: float = 0.5\n\n"
        "@register\n"
        "class Mine(FedAvg):\n"
        f"    name = {algo!r}\n"
        "    Params = Params\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    # without the plugin the name is unknown
    assert _error([f"algorithm.name={algo}"]).key == "algorithm.name"
    cfg = load_config(None, [f"plugins=[{module}]", f"algorithm.name={algo}", "algorithm.mu=2"])
    assert cfg.algorithm == {"name": algo, "mu": 2.0}
    assert algo in algorithm_names()
    # the plugin's own parameters are validated and named
    err = _error([f"plugins=[{module}]", f"algorithm.name={algo}", "algorithm.mu=much"])
    assert err.key == "algorithm.mu"
