"""Killing a running job (3 ranks through ``pfl-mpi run -n 3``) at each of its processes, with SIGTERM and
SIGKILL: no process outlives the launcher, and the file continues (``--resume``) to the planned rounds.

SIGTERM to the launcher, mpiexec or rank 0 stops the run cleanly: exit 143, one line, status
``interrupted``. SIGTERM to a worker alone ends the job (MPI Abort after the worker's grace period);
SIGKILL anywhere ends it too. Zombies do not count as survivors (PID 1 here does not reap them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from pfl_mpi.store import RunWriter
from pfl_mpi.store.run_file import check_reopenable

from .helpers import alive, kill_tree, process_tree

TINY = ["--set", "data.num_clients=8", "--set", "clients_per_round=4", "--set", "model.name=logreg"]
TINY += ["--set", "train.batch_size=32", "--set", "device=cpu", "--set", "eval_every=5", "--quiet"]
_MPI = ("PMI_", "PMIX_", "OMPI_", "MPI_", "HYDRA", "PFL_MPI_")
REAL_RESUME = {("rank0", signal.SIGKILL), ("worker", signal.SIGTERM)}  # the others check what a resume reads
DEADLINE = 60.0  # seconds to wait for an event before the test fails (never asserted as a duration)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_MPI)}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _rank_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
        return None
    rank = env.get(b"PMI_RANK")
    return int(rank) if rank is not None else None


def _committed(path: Path) -> int:
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs["rounds_completed"])
    except (OSError, KeyError):
        return -1


def _wait(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.1)


def _target(launcher: subprocess.Popen, kind: str) -> int:
    tree = process_tree(launcher.pid)
    if kind == "launcher":
        return launcher.pid
    if kind in ("mpiexec", "proxy"):
        name = "mpiexec" if kind == "mpiexec" else "hydra_pmi_proxy"
        return next(p for p in tree if name in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace"))
    want = 0 if kind == "rank0" else 1
    return next(p for p in tree if _rank_of(p) == want)


def _start_long_job(out: Path) -> subprocess.Popen:
    """A 3-rank job (launcher, mpiexec, proxy and its ranks all up) with two rounds committed to ``out``."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "pfl_mpi", "run", "-n", "3", "--out", str(out), "--set", "rounds=100000", *TINY],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait(lambda: _committed(out) >= 2 or launcher.poll() is not None, "two committed rounds")
        assert launcher.poll() is None, launcher.communicate()
        _wait(lambda: len(process_tree(launcher.pid)) >= 5, "launcher, mpiexec, proxy and 3 ranks")
    except BaseException:
        kill_tree(launcher.pid)
        launcher.wait()
        raise
    return launcher


def _end_job(launcher: subprocess.Popen, signals: list[tuple[str, int]]) -> str:
    """Send each (process kind, signal) in turn, then wait for the launcher and every process of the job to end
    (whatever is left after a failure is killed); the launcher's stderr."""
    try:
        processes = process_tree(launcher.pid)
        for kind, signum in signals:
            os.kill(_target(launcher, kind), signum)
        _, err = launcher.communicate(timeout=DEADLINE)
        _wait(lambda: not any(alive(p) for p in processes), "every process of the job to end")
    finally:
        for pid in process_tree(launcher.pid) if launcher.poll() is None else ():
            os.kill(pid, signal.SIGKILL)
        launcher.wait()
    return err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
@pytest.mark.parametrize("kind", ["launcher", "mpiexec", "rank0", "worker"])
def test_killing_any_process_leaves_no_survivor_and_a_file_that_resumes(tmp_path, kind, signum):
    out = tmp_path / "x.h5"
    launcher = _start_long_job(out)
    try:
        processes = process_tree(launcher.pid)
        os.kill(_target(launcher, kind), signum)
        if kind != "launcher" or signum != signal.SIGKILL:
            _, err = launcher.communicate(timeout=DEADLINE)
            assert launcher.returncode != 0
        _wait(lambda: not any(alive(p) for p in processes), "every process of the job to end")
    finally:
        for pid in process_tree(launcher.pid) if launcher.poll() is None else ():
            os.kill(pid, signal.SIGKILL)
        launcher.wait()

    with h5py.File(out, "r", locking=False) as f:
        done, status = int(f.attrs["rounds_completed"]), f.attrs["status"]
    assert done >= 2
    if signum == signal.SIGTERM and kind != "worker":  # a clean stop: committed, said so in one line
        assert status == "interrupted"
        assert launcher.returncode == 143 if kind != "launcher" or signum != signal.SIGKILL else True
        if kind != "launcher" or signum != signal.SIGKILL:
            assert "Traceback" not in err
            assert f"keeps {done} committed round(s), status interrupted" in err
    else:
        assert status in ("running", "interrupted")
    if signum == signal.SIGKILL and kind != "launcher":  # the killed process could not say it: the launcher does
        assert "pfl-mpi: the job ended with exit code " in err and "(a process of it was killed)" in err, err
        assert f"{out} keeps its committed rounds; continue with: pfl-mpi run --resume {out}" in err
    if (kind, signum) in REAL_RESUME:
        resumed = subprocess.run(
            [sys.executable, "-m", "pfl_mpi", "run", "--resume", str(out), "--set", f"rounds={done + 1}", "--quiet"],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert resumed.returncode == 0, resumed.stderr
        with h5py.File(out, "r", locking=False) as f:
            assert int(f.attrs["rounds_completed"]) == done + 1 and f.attrs["status"] == "completed"
    else:  # what --resume does first: open for writing (HDF5's lock free), read back, reopen, read the checkpoint
        check_reopenable(out)
        writer, reopened = RunWriter.reopen(out)
        assert reopened == done
        server, _ = writer.read_checkpoint(done)
        assert server
        writer.close("interrupted")


def test_sigterm_to_the_launcher_of_a_hung_job_leaves_no_survivor(tmp_path):
    """A worker stops answering (SIGSTOP: it never reaches the next collective). SIGTERM to the launcher:
    rank 0 cannot finish its round and ends the job after its grace period, or (the worker stopped just after
    its last message of a round) rank 0 commits and stops, and the launcher kills the job that cannot end.
    Either way no process is left, and the file keeps its committed rounds, readable for a resume."""
    out = tmp_path / "hung.h5"
    launcher = _start_long_job(out)
    err = _end_job(launcher, [("worker", signal.SIGSTOP), ("launcher", signal.SIGTERM)])
    assert launcher.returncode == 143, err
    ended_by_rank = "did not stop within its grace period after SIGTERM" in err
    ended_by_launcher = "the job did not end within 15 s of SIGTERM" in err
    assert (ended_by_rank or ended_by_launcher) and "Traceback" not in err, err
    check_reopenable(out)
    assert _committed(out) >= 2


def test_killing_mpiexecs_proxy_ends_the_job_with_one_line_and_no_survivor(tmp_path):
    """SIGKILL to MPICH's hydra_pmi_proxy: the ranks lose their parent and mpiexec would wait for ever; the
    launcher, which adopts them, ends the job and says so; the file keeps its committed rounds. (The proxy
    ignores SIGTERM: the job then goes on.)"""
    out = tmp_path / "x.h5"
    launcher = _start_long_job(out)
    err = _end_job(launcher, [("proxy", signal.SIGKILL)])
    assert launcher.returncode != 0 and "Traceback" not in err, err
    assert f"{out} keeps its committed rounds; continue with: pfl-mpi run --resume {out}" in err, err
    check_reopenable(out)
    assert _committed(out) >= 2
