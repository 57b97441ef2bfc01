"""The ``-n P`` launcher's supervision of mpiexec (``comm.launch.supervise``), on plain child processes: a
signal is passed on as SIGTERM, and a child that does not end within the grace period is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from .helpers import alive

CHILD = """
import os, signal, sys, time
if {ignore_term}:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(os.getpid(), flush=True)
time.sleep(600)
"""


def _supervisor(ignore_term: bool, grace: float) -> subprocess.Popen:
    """A process running ``supervise`` over a child that sleeps (and ignores SIGTERM if asked)."""
    child = [sys.executable, "-c", CHILD.format(ignore_term=ignore_term)]
    script = textwrap.dedent(f"""
        import sys
        from pfl_mpi.comm.launch import supervise
        sys.exit(supervise({child!r}, grace={grace}))
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _child_pid(proc: subprocess.Popen) -> int:
    line = proc.stdout.readline()
    assert line.strip().isdigit(), (line, proc.stderr.read() if proc.poll() is not None else "")
    return int(line)


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period_with_one_line():
    proc = _supervisor(ignore_term=True, grace=1.0)
    child = _child_pid(proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.splitlines() == [
        "pfl-mpi: the job did not end within 1 s of SIGTERM: killing its processes; the file keeps its committed rounds"
    ]
    assert not alive(child)


def test_a_stopped_child_is_killed_after_the_grace_period():
    """SIGSTOP: the child cannot even receive the SIGTERM passed on to it."""
    proc = _supervisor(ignore_term=False, grace=1.0)
    child = _child_pid(proc)
    os.kill(child, signal.SIGSTOP)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "did not end within 1 s of SIGINT" in err
    assert not alive(child)


def test_a_child_that_ends_on_the_passed_sigterm_gives_its_own_exit_and_no_line():
    proc = _supervisor(ignore_term=False, grace=30.0)
    child = _child_pid(proc)
    proc.send_signal(signal.SIGHUP)  # passed on as SIGTERM: the child dies of it
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err == ""
    assert not alive(child)
