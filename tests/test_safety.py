"""Bad input a careless user gives ``pfl-mpi run``: one line naming the key or path, exit 2, before any rank
starts (no traceback); and the imports a working directory must not hijack.

Every command runs as a user runs it, ``python -m pfl_mpi`` in a fresh directory outside MPI; the
independent ones are started together by one module fixture.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from .test_cli import TINY

PLUGIN = """\
from pfl_mpi.algorithms import register
from pfl_mpi.algorithms.fedavg import FedAvg


@register
class MyAlgo(FedAvg):
    name = "myalgo"
"""
_MPI = ("PMI_", "PMIX_", "OMPI_", "MPI_", "HYDRA", "PFL_MPI_", "SLURM_")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_MPI)}
    env.pop("PYTHONPATH", None)
    return {**env, "OMP_NUM_THREADS": "1", **extra}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def _files(cwd: Path) -> None:
    """What the cases read: a config, broken configs, a data file with a NaN, plugins, a text file."""
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "tiny.yaml").write_text(TINY, encoding="utf-8")
    (cwd / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (cwd / "nul.yaml").write_text('name: "a\\0b"\n', encoding="utf-8")
    x = np.random.default_rng(0).random((200, 4)).astype(np.float32)
    x[17, 2] = np.inf
    np.savez(cwd / "inf.npz", x=x, y=np.arange(200) % 2)
    x[17, 2], x[41, 0] = 0.0, np.nan
    with h5py.File(cwd / "nan.h5", "w") as f:
        f["x"], f["y"] = x, np.arange(200) % 2
    (cwd / "boom.py").write_text('raise RuntimeError("boom at import")\n', encoding="utf-8")
    (cwd / "locked.h5.lock").mkdir()  # where the run's lock file would go
    (cwd / "myalgo.py").write_text(PLUGIN, encoding="utf-8")
    (cwd / "yaml.py").write_text('raise SystemExit("the stray yaml.py was imported")\n', encoding="utf-8")
    (cwd / "notes.h5").write_text("not a run file\n", encoding="utf-8")
    (cwd / "adir.h5").mkdir(exist_ok=True)


BAD = {
    # name: (arguments after "run", key the one line must name, words it must hold)
    "yaml_not_utf8": (["latin1.yaml"], "config", "not UTF-8"),
    "seed_above_2_63": (["tiny.yaml", "--set", "seed=9223372036854775809"], "seed", "less than"),
    "set_broken_yaml": (["tiny.yaml", "--set", "rounds=[1"], "rounds", "not valid YAML"),
    "set_python_tag": (
        ["tiny.yaml", "--set", 'seed=!!python/object/apply:os.system ["touch pwned"]'],
        "seed",
        "python tags",
    ),
    "inf_in_data": (["tiny.yaml", "--set", "data.name=file", "--set", "data.path=inf.npz"], "data.path", "sample 17"),
    "nan_in_h5_data": (["tiny.yaml", "--set", "data.name=file", "--set", "data.path=nan.h5"], "data.path", "sample 41"),
    "cuda_without_gpu": (["tiny.yaml", "--set", "device=cuda"], "device", "no GPU"),
    "plugin_raises": (["tiny.yaml", "--set", "plugins=[./boom.py]"], "plugins", "boom at import"),
    "plugin_missing": (["tiny.yaml", "--set", "plugins=[./nothere.py]"], "plugins", "no such plugin file"),
    "long_name": (["tiny.yaml", "--set", f"name={'a' * 300}"], "name", "at most 100"),
    "nul_in_name": (["nul.yaml"], "name", "printable"),
    "name_is_a_path": (["tiny.yaml", "--set", "name=../x"], "name", "not a name"),
    "out_is_a_directory": (["tiny.yaml", "--out", "adir.h5"], "output", "is a directory"),
    "out_is_not_a_run_file": (["tiny.yaml", "--out", "notes.h5"], "output", "not a pfl_mpi run file"),
    "out_not_a_run_file_even_with_overwrite": (
        ["tiny.yaml", "--out", "notes.h5", "--overwrite"],
        "output",
        "not a pfl_mpi run file",
    ),
    "lr_infinite": (["tiny.yaml", "--set", "train.lr=.inf"], "train.lr", "finite number"),
    "out_empty": (["tiny.yaml", "--out", ""], "output", "--out is empty"),
    "out_name_too_long": (["tiny.yaml", "--out", f"{'b' * 300}.h5"], "output", "File name too long"),
    "out_lock_is_a_directory": (["tiny.yaml", "--out", "locked.h5"], "output", "cannot create the lock file"),
    "zero_ranks": (["tiny.yaml", "-n", "0"], "-n", "at least 1"),
    "negative_ranks": (["tiny.yaml", "-n", "-3"], "-n", "at least 1"),
    "resume_missing": (["--resume", "none.h5"], "resume", "none.h5"),
}


def _start(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pfl_mpi", *args],
        cwd=cwd,
        env=env or _env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> Result:
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return Result(proc.returncode, out, err)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("safety")
    _files(cwd)
    return cwd


@pytest.fixture(scope="module")
def bad(work) -> dict[str, Result]:
    started = {name: _start(["run", *args], work) for name, (args, _, _) in BAD.items()}
    return {name: _finish(proc) for name, proc in started.items()}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_one_line_naming_the_key_and_exit_2(bad, name):
    result, (_, key, words) = bad[name], BAD[name]
    assert result.returncode == 2, result.stderr
    assert len(result.lines()) == 1, result.stderr
    line = result.lines()[0]
    assert line.startswith(f"pfl-mpi: config error: {key}: "), line
    assert words in line
    assert "Traceback" not in result.stderr


def test_python_tags_are_never_executed(bad, work):
    assert not (work / "pwned").exists()


def test_no_run_file_is_written_for_bad_input(bad, work):
    assert not (work / "runs").exists()


def test_a_stray_yaml_py_in_the_working_directory_is_not_imported(bad):
    """Every case above ran beside a yaml.py that exits when imported: none of them imported it."""
    assert not any("stray yaml.py" in r.stderr for r in bad.values())


def test_a_plugin_beside_the_config_is_found_by_name_and_by_path(work):
    """``plugins: [myalgo]`` and ``[./myalgo.py]``: both import the file beside the config (the working
    directory is not on sys.path). The impossible partition that follows proves the algorithm resolved."""
    impossible = ["--set", "data.partition=shards", "--set", "data.classes_per_client=11"]
    runs = [
        _start(["run", "tiny.yaml", "--set", f"plugins=[{p}]", "--set", "algorithm.name=myalgo", *impossible], work)
        for p in ("myalgo", "./myalgo.py")
    ]
    for result in map(_finish, runs):
        assert result.returncode == 2
        assert result.lines() == [result.lines()[0]]
        assert result.lines()[0].startswith("pfl-mpi: config error: data.classes_per_client: "), result.stderr


def test_info_into_a_closed_pipe_is_quiet(work, tmp_path):
    """``pfl-mpi info RUN.h5 | head``: the reader goes away; no BrokenPipeError traceback."""
    from pfl_mpi.comm.serial import SerialWorld
    from pfl_mpi.runtime import Engine
    from tests.helpers import tiny_config

    path = tmp_path / "done.h5"
    assert Engine(tiny_config(path, rounds=2, device="cpu"), SerialWorld(), show_progress=False).run() == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "pfl_mpi", "info", str(path)],
        cwd=work,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # as head does after its lines, here before the first one
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 0


def test_a_plugin_that_imports_only_on_rank_0_ends_the_job_with_one_line(work):
    """Under mpiexec (no launcher validated first): rank 1 cannot import the plugin, rank 0 can. Every rank
    leaves with exit 2 and rank 0 prints rank 1's line, instead of rank 0 waiting for ever."""
    (work / "rank0only.py").write_text(
        'import os\nif os.environ.get("PMI_RANK") != "0":\n    raise ImportError("only on rank 0")\n', encoding="utf-8"
    )
    mpiexec = Path(sys.executable).parent / "mpiexec"
    command = [str(mpiexec), "-n", "2", sys.executable, "-m", "pfl_mpi", "run", "tiny.yaml"]
    run = subprocess.run(
        [*command, "--set", "plugins=[./rank0only.py]"], cwd=work, env=_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith(f"pfl-mpi: config error: plugins: importing {work / 'rank0only.py'} failed: ")
    assert "ImportError: only on rank 0 (rank 1 of 2, host " in lines[0]


@pytest.mark.parametrize("command", [["info"], ["report", "-o", "rep"], ["export", "--csv", "x.csv"]])
@pytest.mark.parametrize("target", ["adir.h5", "notes.h5"])
def test_readers_refuse_a_directory_or_a_file_that_is_no_run_file_in_one_line(work, command, target):
    """HDF5's own message for these spans lines; the readers say what the path is, in one line, exit 1."""
    result = _finish(_start([command[0], target, *command[1:]], work))
    assert result.returncode == 1, result.stderr
    assert len(result.lines()) == 1 and "Traceback" not in result.stderr, result.stderr
    what = "is a directory, not a run file" if target == "adir.h5" else "is not a pfl_mpi run file (not an HDF5 file)"
    assert result.lines()[0].endswith(f"{target}: {target} {what}"), result.lines()[0]


BREAKS = """\
import os

from pfl_mpi.algorithms import register
from pfl_mpi.algorithms.fedavg import FedAvg

calls = [0]


@register
class Breaks(FedAvg):
    name = "breaks"

    def finish_training(self, client, payload, means):
        calls[0] += 1
        if os.environ.get("PMI_RANK") == "1" and calls[0] > 4:  # rank 1, in its second round or later
            raise RuntimeError("rank 1 broke mid-run")
        return super().finish_training(client, payload, means)
"""


def test_an_exception_on_a_worker_mid_run_ends_every_rank_with_its_message(work):
    """After the first collectives (rounds committed): rank 1 raises in a client step. The job ends (no rank
    waits for ever), exit 1, with rank 1's message; the file keeps its committed rounds and resumes."""
    (work / "breaks.py").write_text(BREAKS, encoding="utf-8")
    out = work / "breaks.h5"
    run = ["run", "tiny.yaml", "-n", "2", "--out", str(out), "--quiet", "--set", "rounds=30"]
    result = _finish(_start([*run, "--set", "plugins=[./breaks.py]", "--set", "algorithm.name=breaks"], work))
    assert result.returncode == 1, result.stderr
    assert result.lines()[0] == "pfl-mpi: rank 1 of 2 failed:", result.stderr
    assert "RuntimeError: rank 1 broke mid-run" in result.stderr
    with h5py.File(out, "r", locking=False) as f:
        assert 1 <= int(f.attrs["rounds_completed"]) < 30 and f.attrs["status"] == "running"


def test_a_plugin_in_the_working_directory_is_found_when_given_as_a_file(work):
    """The config lives elsewhere (sub/), the plugin in the working directory: ``--set plugins=[./myalgo.py]``
    is relative to the working directory and imports it; ``[myalgo]`` is not searched there, and the one
    line says how to name the file."""
    (work / "sub").mkdir(exist_ok=True)
    (work / "sub" / "cfg.yaml").write_text(TINY, encoding="utf-8")
    impossible = ["--set", "data.partition=shards", "--set", "data.classes_per_client=11"]
    sets = ["--set", "algorithm.name=myalgo", *impossible]
    runs = {
        p: _start(["run", "sub/cfg.yaml", "--set", f"plugins=[{p}]", *sets], work) for p in ("./myalgo.py", "myalgo")
    }
    by_path, by_name = _finish(runs["./myalgo.py"]), _finish(runs["myalgo"])
    assert by_path.returncode == 2 and len(by_path.lines()) == 1, by_path.stderr
    assert by_path.lines()[0].startswith("pfl-mpi: config error: data.classes_per_client: "), by_path.stderr
    assert by_name.returncode == 2 and by_name.lines() == [
        "pfl-mpi: config error: plugins: cannot import 'myalgo': No module named 'myalgo' "
        "(the working directory is not searched: give the file, ./myalgo.py)"
    ]
