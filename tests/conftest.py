"""Test set-up shared by plain and MPI runs.

Plain ``pytest`` does not collect tests/mpi (they need ``mpiexec -n N python -m pytest --with-mpi``).
Under MPI, ranks > 0 print only their failures, and every rank exits with the worst outcome of
all ranks: a test failing on rank 1 alone fails the run (pytest-mpi alone shows it as passed).
"""

from __future__ import annotations

import os
import sys

import pytest

collect_ignore_glob: list[str] = []
if "--with-mpi" not in sys.argv:
    collect_ignore_glob.append("mpi/*")


@pytest.fixture(autouse=True)
def _one_torch_thread(monkeypatch):
    """Every test runs torch on one thread, as the runtime does by default (``threads: 1``): small models
    are slower with more, and much slower when the machine is busy. The engine also pins torch threads
    and OMP_NUM_THREADS; give the rest of the session its own back."""
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--with-mpi", default=False) and _comm().Get_rank() > 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the terminal reporter writes here for the session


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed and "mpi4py.MPI" in sys.modules and _comm().Get_rank() > 0:
        print(
            f"[rank {_comm().Get_rank()}] {report.nodeid} {report.when} FAILED\n{report.longreprtext}",
            file=sys.stderr,
            flush=True,
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.getoption("--with-mpi", default=False):
        worst = _comm().allreduce(int(exitstatus), op=__import__("mpi4py").MPI.MAX)
        if worst and not exitstatus:
            print("another rank failed (see its report on stderr)", file=sys.stderr, flush=True)
        session.exitstatus = worst
