"""The ``pfl-mpi`` command as a user runs it: ``python -m pfl_mpi`` in a fresh directory, outside MPI.

Every process is started by one module fixture, the independent ones concurrently, to keep this fast.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pfl_mpi.store import read_summary

TINY = """\
name: tiny
seed: 1
rounds: 2
clients_per_round: 4
device: cpu
data:
  name: digits
  num_clients: 8
model:
  name: logreg
train:
  local_epochs: 1
  batch_size: 32
algorithm:
  name: fedavg
"""

_MPI_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "PRTE_", "I_MPI_", "HYDRA_", "MPI_", "PFL_MPI_")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_MPI_PREFIXES)}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    cwd: Path

    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def _start(args: list[str], cwd: Path) -> tuple[list[str], Path, subprocess.Popen]:
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "tiny.yaml").write_text(TINY, encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pfl_mpi", *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return args, cwd, proc


def _run_all(jobs: dict[str, tuple[list[str], Path]]) -> dict[str, Result]:
    """Start every job at once, then wait for all of them."""
    started = {name: _start(args, cwd) for name, (args, cwd) in jobs.items()}
    results = {}
    for name, (args, cwd, proc) in started.items():
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = Result(args, proc.returncode, out, err, cwd)
    return results


BAD_INPUTS = {
    # name: (arguments after "run", key the message must name)
    "unknown_key": (["tiny.yaml", "--set", "train.lrr=0.1"], "train.lrr"),
    "wrong_type": (["tiny.yaml", "--set", "rounds=abc"], "rounds"),
    "unknown_algorithm": (["tiny.yaml", "--set", "algorithm.name=nope"], "algorithm.name"),
    "unknown_data_set": (["tiny.yaml", "--set", "data.name=imagenet"], "data.name"),
    "impossible_partition": (
        ["tiny.yaml", "--set", "data.partition=shards", "--set", "data.classes_per_client=11"],
        "data.classes_per_client",
    ),
    "missing_config_file": (["missing.yaml"], "config"),
    "set_without_equals": (["tiny.yaml", "--set", "rounds"], "rounds"),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> dict[str, Result]:
    root = tmp_path_factory.mktemp("cli")
    good = root / "good"
    # phase 1: every bad input and a good run
    jobs = {name: (["run", *args], root / name) for name, (args, _) in BAD_INPUTS.items()}
    jobs["good"] = (["run", "tiny.yaml"], good)
    results = _run_all(jobs)
    assert results["good"].returncode == 0, results["good"].stderr
    # phase 2: info, a refused resume, a resume that extends a copy of the run
    original = good / "runs" / "tiny.h5"
    extended = root / "extend"
    extended.mkdir()
    shutil.copy(original, extended / "copy.h5")
    results |= _run_all(
        {
            "info": (["info", "runs/tiny.h5"], good),
            "resume_changed": (["run", "--resume", "runs/tiny.h5", "--set", "train.lr=0.5"], good),
            "resume_extend": (["run", "--resume", "copy.h5", "--set", "rounds=3"], extended),
        }
    )
    # phase 3: info on the extended run
    results |= _run_all({"info_extended": (["info", "copy.h5"], extended)})
    return results


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(cli, name):
    result, key = cli[name], BAD_INPUTS[name][1]
    assert result.returncode == 2, result.stderr
    lines = result.stderr_lines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"pfl-mpi: config error: {key}"), lines[0]
    assert "Traceback" not in result.stderr
    assert not (result.cwd / "runs").exists()  # nothing was started


def test_bad_input_messages_say_what_is_wrong(cli):
    assert "'nope'" in cli["unknown_algorithm"].stderr
    assert "'digits'" in cli["unknown_data_set"].stderr  # the data sets there are
    assert "missing.yaml" in cli["missing_config_file"].stderr
    assert "key=value" in cli["set_without_equals"].stderr
    assert "11" in cli["impossible_partition"].stderr


def test_good_run(cli):
    result = cli["good"]
    path = result.cwd / "runs" / "tiny.h5"
    assert path.exists()
    summary = read_summary(path)
    r = summary.rounds
    assert summary.rounds_completed == 2 and summary.attrs["status"] == "completed"
    lines = result.stdout.splitlines()
    round_lines = [line for line in lines if line.startswith("round ")]
    assert len(round_lines) == 2
    for t, line in enumerate(round_lines):
        assert line.startswith(f"round {t + 1}/2")
        assert f"train_loss {r['train_loss'][t]:.4f}" in line
        assert f"test_acc {r['test_acc'][t]:.4f}" in line
    assert f"done: 2 rounds, wrote {Path('runs') / 'tiny.h5'}" in lines
    assert f"final test accuracy {r['test_acc'][-1]:.4f}" in result.stdout
    assert "Traceback" not in result.stderr


def test_info_reports_the_file(cli):
    result = cli["info"]
    assert result.returncode == 0, result.stderr
    summary = read_summary(result.cwd / "runs" / "tiny.h5")
    out = result.stdout
    assert re.search(r"algorithm (\w+),", out).group(1) == "fedavg" == summary.attrs["algorithm"]
    done, planned = map(int, re.search(r"(\d+)/(\d+) rounds completed", out).groups())
    assert (done, planned) == (summary.rounds_completed, 2) == (2, 2)
    acc = float(re.search(r"test accuracy ([0-9.]+)", out).group(1))
    assert acc == pytest.approx(summary.rounds["test_acc"][-1], abs=5e-5)
    loss = float(re.search(r"last train loss ([0-9.]+)", out).group(1))
    assert loss == pytest.approx(summary.rounds["train_loss"][-1], abs=5e-5)
    assert "status completed" in out


def test_resume_with_a_changed_key_is_refused(cli):
    result = cli["resume_changed"]
    assert result.returncode == 2, result.stderr
    lines = result.stderr_lines()
    assert len(lines) == 1 and lines[0].startswith("pfl-mpi: config error: resume"), result.stderr
    assert "rounds" in lines[0]
    assert "round " not in result.stdout
    # the file was left as it was
    summary = read_summary(result.cwd / "runs" / "tiny.h5")
    assert summary.rounds_completed == 2 and summary.attrs["status"] == "completed"


def test_resume_extends_the_run(cli):
    result = cli["resume_extend"]
    assert result.returncode == 0, result.stderr
    round_lines = [line for line in result.stdout.splitlines() if line.startswith("round ")]
    assert len(round_lines) == 1 and round_lines[0].startswith("round 3/3")
    assert "done: 3 rounds" in result.stdout
    extended = read_summary(result.cwd / "copy.h5")
    original = read_summary(cli["good"].cwd / "runs" / "tiny.h5")
    assert extended.rounds_completed == 3 and extended.attrs["status"] == "completed"
    np.testing.assert_array_equal(extended.rounds["test_acc"][:2], original.rounds["test_acc"])


def test_info_after_resume_reports_the_new_plan(cli):
    """After ``--resume --set rounds=3`` the file's plan is 3 rounds: info says 3/3, not 3/2."""
    result = cli["info_extended"]
    assert result.returncode == 0, result.stderr
    done, planned = map(int, re.search(r"(\d+)/(\d+) rounds completed", result.stdout).groups())
    assert (done, planned) == (3, 3)
    assert read_summary(result.cwd / "copy.h5").attrs["rounds_planned"] == 3


# -- more refusals, in this process (cli.main) to keep the suite fast --------------------------


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith(_MPI_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    "args,key",
    [
        (["run", "tiny.yaml", "--set", "data.num_clients=1000"], "data.num_clients"),
        (["run", "tiny.yaml", "--set", "model.head_layers=2"], "model.head_layers"),
        (["run", "tiny.yaml", "--set", "colour=red"], "colour"),
        (["run", "tiny.yaml", "--set", "algorithm.name=topk", "--set", "algorithm.k=1000000"], "algorithm.k"),
        (["run", "tiny.yaml", "--set", "algorithm.name=fetchsgd", "--set", "algorithm.k=1000000"], "algorithm.k"),
        (["run", "tiny.yaml", "--set", "plugins=[no_such_plugin_module_xyz]"], "plugins"),
        (["run", "tiny.yaml", "--resume", "runs/tiny.h5"], "config"),
        (["run", "--resume", "nothing.h5"], "resume"),
    ],
)
def test_main_refuses_with_exit_2(in_tmp, capsys, args, key):
    from pfl_mpi.cli import main

    assert main(args) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"pfl-mpi: config error: {key}"), err
    assert out == ""
    assert not (in_tmp / "runs").exists()


def test_main_info_of_a_missing_file(in_tmp, capsys):
    from pfl_mpi.cli import main

    assert main(["info", "nothing.h5"]) == 1
    out, err = capsys.readouterr()
    assert "nothing.h5" in err and "Traceback" not in err


def test_version_prints_the_package_version(capsys):
    from pfl_mpi import __version__
    from pfl_mpi.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"pfl-mpi {__version__}"
