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
ON_TERM = {{"default": signal.SIG_DFL, "ignore": signal.SIG_IGN, "exit": lambda *_: sys.exit(0)}}
signal.signal(signal.SIGTERM, ON_TERM[{on_term!r}])
print(os.getpid(), flush=True)
time.sleep(600)
"""


def _supervisor(on_term: str, grace: float) -> subprocess.Popen:
    """A process running ``supervise`` over a child that sleeps; on SIGTERM it dies (``default``), ignores it
    (``ignore``) or exits from a handler as the ranks do (``exit``)."""
    child = [sys.executable, "-c", CHILD.format(on_term=on_term)]
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
    proc = _supervisor("ignore", grace=1.0)
    child = _child_pid(proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.splitlines() == [
        "pfl-mpi: the job did not end within 1 s of SIGTERM: killing its processes; the file keeps its committed rounds"
    ]
    assert not alive(child)


def test_a_stopped_child_is_killed_after_the_grace_period():
    """SIGSTOP: the child's handler cannot run on the SIGTERM passed on to it (a default SIGTERM would still kill
    a stopped process; a handled one waits for SIGCONT)."""
    proc = _supervisor("exit", grace=1.0)
    child = _child_pid(proc)
    os.kill(child, signal.SIGSTOP)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "did not end within 1 s of SIGINT" in err
    assert not alive(child)


def test_a_child_that_ends_on_the_passed_sigterm_gives_its_own_exit_and_no_line():
    proc = _supervisor("default", grace=30.0)
    child = _child_pid(proc)
    proc.send_signal(signal.SIGHUP)  # passed on as SIGTERM: the child dies of it
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err == ""
    assert not alive(child)
