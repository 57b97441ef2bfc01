"""Starting the job: are we under mpiexec already, and if not, how to start ourselves under it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .world import POLL_MAX_MS

# Variables that MPICH's Hydra, Open MPI/PRRTE, Intel MPI and srun (PMI-2/PMIx) set in every rank.
_RANK_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID")


def under_mpi() -> bool:
    """True when this process was started by an MPI launcher (or PFL_MPI_FORCE_MPI=1)."""
    if os.environ.get("PFL_MPI_FORCE_MPI") == "1":
        return True
    return any(name in os.environ for name in _RANK_VARIABLES)


def mpiexec_path() -> str:
    """The venv's own mpiexec (never a system one that may belong to another MPI), else the PATH's."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec")
    if found is None:
        raise FileNotFoundError("no mpiexec found beside the Python interpreter or on PATH; install the 'mpi' extra")
    return found


def relaunch_command(n: int, module_args: list[str]) -> list[str]:
    """The command that runs ``python -m pfl_mpi <module_args>`` on ``n`` ranks."""
    return [mpiexec_path(), "-n", str(n), sys.executable, "-m", "pfl_mpi", *module_args]


def make_world(poll_max: float = POLL_MAX_MS / 1000, wait: str = "polled"):
    """The world of this process: MPI ranks under a launcher, a single process otherwise.

    ``poll_max`` (seconds) and ``wait`` say how a rank completes a collective (see ``MPIWorld``)."""
    if under_mpi():
        from .mpi_world import MPIWorld

        return MPIWorld(poll_max=poll_max, wait=wait)
    from .serial import SerialWorld

    return SerialWorld()


# -- supervising mpiexec ------------------------------------------------------------------------
STOP_GRACE = 15.0  # seconds the job gets to stop after a forwarded signal before everything left is killed
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36


def _prctl(option: int, value: int) -> None:
    """Linux prctl(2), best effort (elsewhere, or without libc, nothing happens)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _term_with_parent() -> None:  # runs in the child between fork and exec
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _processes() -> dict[int, tuple[int, int]]:
    """(parent, start time in clock ticks) of every living (not zombie) process, from /proc."""
    found: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            found[int(entry)] = (int(fields[1]), int(fields[19]))
    return found


def _descendants(root: int) -> list[int]:
    """Living (not zombie) processes below ``root``, from /proc."""
    parent = {pid: ppid for pid, (ppid, _) in _processes().items()}
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, ppid in parent.items() if ppid == pid]
        found += children
        frontier += children
    return found


def _reap() -> None:
    """Collect exited children (adopted ones included: this process is their subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _end_leftovers(grace: float) -> None:
    """SIGTERM every process still below this one (ranks orphaned by a killed mpiexec), SIGKILL after ``grace``."""
    me = os.getpid()
    deadline = time.monotonic() + grace
    sent = False
    while True:
        _reap()
        left = _descendants(me)
        if not left:
            return
        late = time.monotonic() >= deadline
        if late or not sent:
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
            sent = True
        time.sleep(0.05)


def supervise(command: list[str], grace: float = STOP_GRACE) -> int:
    """Run ``command`` (mpiexec) so that no process outlives this one, and return its exit code.

    SIGTERM, SIGINT and SIGHUP here are passed on to mpiexec as SIGTERM (it forwards them to the ranks,
    which commit and stop); a second one kills it. A job still running ``grace`` seconds after the first
    signal (a rank that never reaches the end: stopped, or hung in a collective) is killed, with one line
    saying so. mpiexec gets SIGTERM if this process dies (SIGKILL included), and runs in its own session so
    that a terminal's Ctrl-C reaches only this process. This process adopts the ranks when mpiexec dies
    (child subreaper): whatever is left when mpiexec has ended gets SIGTERM, then SIGKILL after ``grace``
    seconds; ranks it adopts while mpiexec runs (their proxy died) end the job (``_watch_for_orphans``).
    The exit code is mpiexec's (128 + signal if a signal ended it; 143 for a job killed here after
    its grace period, as for any job that a SIGTERM ended)."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    proc = subprocess.Popen(command, start_new_session=True, preexec_fn=_term_with_parent)  # noqa: PLW1509
    received: list[int] = []
    killed = threading.Event()

    def kill_late() -> None:  # the grace period after the first signal is over
        if proc.poll() is not None:
            return
        print(
            f"pfl-mpi: the job did not end within {grace:g} s of {signal.Signals(received[0]).name}: killing its "
            "processes; the file keeps its committed rounds",
            file=sys.stderr,
            flush=True,
        )
        killed.set()
        for pid in _descendants(os.getpid()):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    timer = threading.Timer(grace, kill_late)
    timer.daemon = True

    def forward(signum: int, frame) -> None:
        received.append(signum)
        if len(received) == 1:
            timer.start()
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGTERM if len(received) == 1 else signal.SIGKILL)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    ended = threading.Event()
    threading.Thread(target=_watch_for_orphans, args=(proc, ended), daemon=True).start()
    try:
        code = proc.wait()
        ended.set()
        timer.cancel()
        _end_leftovers(grace if len(received) < 2 and not killed.is_set() else 0.0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if killed.is_set():
        return 128 + signal.SIGTERM
    return 128 - code if code < 0 else code


ORPHAN_CHECK_SECONDS = 2.0  # how often the launcher looks for ranks that lost their parent (mpiexec's proxy)


def _watch_for_orphans(proc: subprocess.Popen, ended: threading.Event) -> None:
    """While mpiexec runs, its ranks are below it. A process started after mpiexec and adopted by this one (its
    parent died: mpiexec's proxy, killed) in two checks in a row means mpiexec lost part of its job and would wait
    for ever: kill mpiexec and everything below this process (the caller then reports the killed job)."""
    me, seen = os.getpid(), False
    started = _processes().get(proc.pid, (0, 0))[1]
    while not ended.wait(ORPHAN_CHECK_SECONDS):
        processes = _processes()
        adopted = [pid for pid, (parent, start) in processes.items() if parent == me and start >= started]
        adopted = [pid for pid in adopted if pid != proc.pid]
        if adopted and seen and proc.poll() is None:
            for pid in [proc.pid, *_descendants(me)]:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            return
        seen = bool(adopted)
