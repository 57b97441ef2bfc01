"""``pfl-mpi watch``: follows a file that a running job writes, one progress line per committed round."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.report.watch import EXIT_DIVERGED, EXIT_TIMEOUT, watch
from pfl_mpi.runtime import Engine
from pfl_mpi.store.lock import RunLock
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
ROUND = re.compile(r"^round +(\d+)/(\d+)  train_loss ")


def _rounds(text: str) -> list[tuple[int, int]]:
    return [(int(m.group(1)), int(m.group(2))) for m in map(ROUND.match, text.splitlines()) if m]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    path = tmp_path_factory.mktemp("watch") / "done.h5"
    assert Engine(tiny_config(path, rounds=3, device="cpu"), SerialWorld(), show_progress=False).run() == 0
    return path


def test_watch_follows_a_running_job(tmp_path):
    """A real job in a subprocess, watched by another started first (the file does not exist yet)."""
    path = tmp_path / "job.h5"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    sets = {
        "name": "watched",
        "rounds": 8,
        "eval_every": 2,
        "device": "cpu",
        "data.name": "digits",
        "data.num_clients": 20,
        "data.partition": "shards",
        "data.classes_per_client": 2,
        "model.name": "mlp",
        "model.hidden": "[32]",
        "train.local_epochs": 2,
        "train.batch_size": 8,
        "algorithm.name": "fedavg",
    }
    run_cmd = [sys.executable, "-m", "pfl_mpi", "run", "--out", str(path)]
    for k, v in sets.items():
        run_cmd += ["--set", f"{k}={v}"]
    watcher = subprocess.Popen(
        [sys.executable, "-m", "pfl_mpi", "watch", str(path), "--interval", "0.05", "--timeout", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    job = subprocess.Popen(run_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    job_out, job_err = job.communicate(timeout=90)
    watch_out, watch_err = watcher.communicate(timeout=90)
    assert job.returncode == 0, job_err
    assert watcher.returncode == 0, watch_err
    assert _rounds(watch_out) == [(t, 8) for t in range(1, 9)], watch_out
    assert watch_out.splitlines()[-1] == f"{path}: completed, 8/8 rounds"
    # the job's own stdout is a pipe: exactly one plain line per round, the same lines, no bar
    assert "\r" not in job_out and "\x1b" not in job_out
    assert _rounds(job_out) == [(t, 8) for t in range(1, 9)]
    job_lines = [line for line in job_out.splitlines() if ROUND.match(line)]
    watch_lines = [line for line in watch_out.splitlines() if ROUND.match(line)]
    strip = re.compile(r"  [\d.]+ s$")  # the job's last round's seconds_io is set after it printed
    assert [strip.sub("", s) for s in watch_lines] == [strip.sub("", s) for s in job_lines]


def test_rounds_appear_between_polls_and_read_errors_are_retried(finished, tmp_path):
    """A file that is not yet a run file, then a running run with 1 committed round, then 3 and completed."""
    path = tmp_path / "live.h5"
    path.write_bytes(b"half-written")
    steps = []

    def advance(_seconds: float) -> None:
        steps.append(len(steps))
        if len(steps) == 1:
            shutil.copy(finished, path)
            with h5py.File(path, "r+") as f:
                f.attrs["rounds_completed"], f.attrs["status"] = 1, "running"
        elif len(steps) == 2:
            pass  # nothing new: nothing printed
        else:
            with h5py.File(path, "r+") as f:
                f.attrs["rounds_completed"], f.attrs["status"] = 3, "completed"

    out = io.StringIO()
    with RunLock(path):  # a live job holds its file's lock
        assert watch(path, interval=0.0, timeout=30, out=out, sleep=advance) == 0
    assert _rounds(out.getvalue()) == [(1, 3), (2, 3), (3, 3)]
    assert len(steps) == 3


def test_timeout_and_diverged(finished, tmp_path, capsys):
    missing = tmp_path / "never.h5"
    assert watch(missing, interval=0.01, timeout=0.2, out=io.StringIO()) == EXIT_TIMEOUT
    assert "timed out" in capsys.readouterr().err
    diverged = tmp_path / "diverged.h5"
    shutil.copy(finished, diverged)
    with h5py.File(diverged, "r+") as f:
        f.attrs["status"] = "diverged"
    out = io.StringIO()
    assert watch(diverged, interval=0.01, timeout=5, out=out) == EXIT_DIVERGED
    assert _rounds(out.getvalue()) == [(1, 3), (2, 3), (3, 3)]


def _copy(finished, path, **attrs):
    shutil.copy(finished, path)
    with h5py.File(path, "r+") as f:
        f.attrs.update(attrs)
    return path


def test_an_interrupted_job_ends_the_watch_with_how_to_continue(finished, tmp_path):
    path = _copy(finished, tmp_path / "stopped.h5", status="interrupted")
    out = io.StringIO()
    assert watch(path, interval=0.0, timeout=30, out=out, sleep=lambda s: None) == 1
    assert out.getvalue().splitlines()[-1] == (
        f"{path}: interrupted, 3/3 rounds; continue it with: pfl-mpi run --resume {path}"
    )


def test_a_running_file_nobody_writes_ends_the_watch(finished, tmp_path):
    """Status running (a killed job), no progress and its lock free on two polls: the watch says so."""
    path = _copy(finished, tmp_path / "killed.h5", status="running")
    out = io.StringIO()
    assert watch(path, interval=0.0, timeout=30, out=out, sleep=lambda s: None) == 1
    assert _rounds(out.getvalue()) == [(1, 3), (2, 3), (3, 3)]
    assert out.getvalue().splitlines()[-1].startswith(f"{path}: no job is writing it (its lock is free)")


def test_a_running_file_whose_lock_is_held_is_waited_for(finished, tmp_path, capsys):
    path = _copy(finished, tmp_path / "live.h5", status="running")
    with RunLock(path):
        assert watch(path, interval=0.01, timeout=0.3, out=io.StringIO()) == EXIT_TIMEOUT
    assert "timed out" in capsys.readouterr().err


def test_a_torn_read_is_retried_not_a_traceback(finished, tmp_path):
    """Caught between two writes of a flush: rounds_completed says 3 but the rows hold 2. Nothing is printed
    from the torn state; the next poll reads the finished file."""
    path = _copy(finished, tmp_path / "torn.h5", status="running")
    with h5py.File(path, "r+") as f:
        for ds in f["rounds"].values():
            ds.resize(2, axis=0)
    polls = []

    def finish(_seconds: float) -> None:
        polls.append(1)
        shutil.copy(finished, path)

    out = io.StringIO()
    with RunLock(path):
        assert watch(path, interval=0.0, timeout=30, out=out, sleep=finish) == 0
    assert _rounds(out.getvalue()) == [(1, 3), (2, 3), (3, 3)] and len(polls) == 1
