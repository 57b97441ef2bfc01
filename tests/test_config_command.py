"""``pfl-mpi config``: the resolved, validated configuration with every default, which ``run`` accepts back;
``--explain`` the same values with each key's description above it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pfl_mpi.algorithms.ditto import DittoParams
from pfl_mpi.cli import main
from pfl_mpi.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
DITTO = str(ROOT / "configs" / "ditto.yaml")


def _leaves(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out.add(f"{prefix}{key}")
    return out


def test_prints_every_key_resolved_and_run_reads_it_back(tmp_path, capsys):
    assert main(["config", DITTO, "--set", "rounds=7", "--set", "algorithm.lam=0.5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = load_config(DITTO, ["rounds=7", "algorithm.lam=0.5"]).model_dump(mode="json")
    assert printed == expected
    assert printed["rounds"] == 7 and printed["algorithm"]["lam"] == 0.5
    raw = yaml.safe_load(Path(DITTO).read_text())
    assert _leaves(printed) > _leaves(raw)  # the defaults the file leaves out are there
    assert set(RunConfig.model_fields) == set(printed)
    assert set(DittoParams.model_fields) | {"name"} == set(printed["algorithm"])
    again = tmp_path / "resolved.yaml"
    again.write_text(yaml.safe_dump(printed))
    assert load_config(again).model_dump(mode="json") == expected


def test_defaults_without_a_file(capsys):
    assert main(["config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == RunConfig().model_dump(mode="json") | {
        "algorithm": load_config().algorithm
    }


def test_explain_comments_every_described_key(capsys):
    assert main(["config", DITTO, "--explain"]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text) == load_config(DITTO).model_dump(mode="json")  # comments aside, the same YAML
    lines = text.splitlines()

    def comment_above(key_line: str) -> str:
        i = lines.index(key_line)
        j = i
        while lines[j - 1].lstrip().startswith("#"):
            j -= 1
        return " ".join(line.strip().lstrip("# ") for line in lines[j:i])

    assert comment_above("rounds: 30") == RunConfig.model_fields["rounds"].description
    assert comment_above("  lam: 1.0") == " ".join(DittoParams.model_fields["lam"].description.split())
    assert comment_above("device: auto").endswith("(one of: auto, cpu, cuda)")
    assert "ditto" in comment_above("  name: ditto") and "fedavg" in comment_above("  name: ditto")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "train.lr=-1"], "pfl-mpi: config error: train.lr"),
        (["--set", "nosuch=1"], "pfl-mpi: config error: nosuch"),
        (["--set", "data.classes_per_client=11"], "pfl-mpi: config error: data.classes_per_client"),
    ],
)
def test_bad_config_exits_2_with_one_line(args, message, capsys):
    assert main(["config", DITTO, *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message) and captured.out == ""
