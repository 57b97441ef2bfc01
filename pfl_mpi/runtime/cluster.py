"""What the batch system tells a rank: the launch check, requeue, and the job's attributes for the run file.

Everything here reads the environment (``os.environ`` unless a mapping is given), so it is tested
without SLURM. Variables measured on Slurm 22.05 (docs/slurm.md):

- in the batch script: ``SLURM_JOB_ID``, ``SLURM_NTASKS`` (the allocation), no ``SLURM_STEP_*``;
- in a task started by ``srun``: ``SLURM_STEP_NUM_TASKS``, ``SLURM_PROCID``, and with ``--mpi=pmi2``
  ``PMI_RANK``/``PMI_SIZE``; without a PMI plugin nothing tells MPI about the other tasks, and
  each task starts as a singleton of size 1;
- in a rank started by an ``mpiexec`` inside the job: the launcher's ``PMI_SIZE`` (MPICH, Intel MPI)
  or ``OMPI_COMM_WORLD_SIZE`` (Open MPI), while ``SLURM_STEP_NUM_TASKS`` counts its node daemons.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Who says how many ranks were started, most specific first: an mpiexec inside the job, then srun.
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS")
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
# SLURM_* variable -> run file attribute, recorded when the run is created inside a job
JOB_VARIABLES = {
    "SLURM_JOB_ID": "slurm_job_id",
    "SLURM_JOB_NAME": "slurm_job_name",
    "SLURM_ARRAY_JOB_ID": "slurm_array_job_id",
    "SLURM_ARRAY_TASK_ID": "slurm_array_task_id",
    "SLURM_JOB_NODELIST": "slurm_nodelist",
    "SLURM_JOB_PARTITION": "slurm_partition",
    "SLURM_CLUSTER_NAME": "slurm_cluster",
    "SLURM_RESTART_COUNT": "slurm_restart_count",
}
_NUMERIC = {"SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"}


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _int(value: str) -> int | str:
    return int(value) if value.strip().isdigit() else value


def expected_size(env: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """How many ranks the launcher started, and the variable that says so (None: no launcher says)."""
    env = _env(env)
    for name in SIZE_VARIABLES:
        value = env.get(name, "").strip()
        if value.isdigit():
            return int(value), name
    return None


def launch_mismatch(size: int, env: Mapping[str, str] | None = None) -> str | None:
    """Why this job is misstarted when MPI sees ``size`` ranks but the launcher started another number
    (srun without a PMI plugin starts N singletons that would each run the whole experiment); else None."""
    expected = expected_size(env)
    if expected is None or expected[0] == size:
        return None
    count, name = expected
    fix = (
        "srun gave MPI no process information: use srun --mpi=pmi2 (or your site MPI's plugin, see "
        "srun --mpi=list) or mpiexec"
        if name == "SLURM_STEP_NUM_TASKS"
        else "the launcher and mpi4py's MPI library do not match (another MPI, or the wrong srun --mpi plugin)"
    )
    return f"MPI sees {size} rank(s) but {count} were started ({name}={count}); {fix}"


def launcher_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank according to its launcher, known before MPI starts (0 when none says)."""
    env = _env(env)
    for name in RANK_VARIABLES:
        value = env.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def restart_count(env: Mapping[str, str] | None = None) -> int:
    """How many times SLURM requeued this job (``SLURM_RESTART_COUNT``; 0 outside SLURM)."""
    value = _env(env).get("SLURM_RESTART_COUNT", "0").strip()
    return int(value) if value.isdigit() else 0


def requeued(env: Mapping[str, str] | None = None) -> bool:
    """True in a SLURM job that was requeued (it must continue its run file, not start again)."""
    return restart_count(env) > 0


def gpu_names() -> list[str]:
    """Names of the GPUs this process sees (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def slurm_attributes(env: Mapping[str, str] | None = None) -> dict[str, int | str]:
    """The ``slurm_*`` attributes of the job this process runs in (empty outside SLURM)."""
    env = _env(env)
    if "SLURM_JOB_ID" not in env:
        return {}
    attrs = {
        attr: _int(env[name]) if name in _NUMERIC else env[name] for name, attr in JOB_VARIABLES.items() if name in env
    }
    attrs.setdefault("slurm_restart_count", 0)
    return attrs


def job_attributes(env: Mapping[str, str] | None = None) -> dict[str, object]:
    """Root attributes of a new run file (on rank 0): the SLURM job, and the GPUs visible to rank 0
    (under ``--gpus-per-node`` every task of a node sees that node's GPUs)."""
    return {**slurm_attributes(env), "gpus": gpu_names()}


# -- SIGTERM (SLURM's time limit, scancel) and SIGINT (Ctrl-C) on a rank ----------------------------
STOP_GRACE_SERVER = 8.0  # seconds rank 0 gets to finish the round in flight and commit, after a signal
STOP_GRACE_WORKER = 6.0  # seconds a worker waits for rank 0's stop before it ends the job itself


class Stopper:
    """Turns SIGTERM/SIGINT into a clean stop: rank 0 asks the engine to stop after the round in flight
    (``stop_code`` = 128 + signal, sent to every rank in the next control word; the engine commits and the
    file's status becomes ``interrupted``). A worker waits for that stop. Whoever is still running after its
    grace period (a long round, or a signal that reached a worker only) ends the whole job (MPI Abort): the
    file keeps its committed rounds. A second signal ends the job at once. Before the ranks agreed to start,
    a signal is only noted; ``check`` raises ``Interrupted`` for it, and so does any signal while the engine
    is being built. A failed write of the run file (``on_failure``) stops the run the same way."""

    def __init__(self, world=None) -> None:
        self.world = world
        self.engine = None
        self.armed = False  # raise Interrupted on a signal (while the engine is built)
        self.signum: int | None = None
        self.failure: Exception | None = None
        self._timer = None
        self._previous: dict = {}

    @property
    def signal_name(self) -> str:
        import signal

        return signal.Signals(self.signum).name if self.signum else "-"

    def install(self) -> None:
        import signal

        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        import signal

        if self._timer is not None:
            self._timer.cancel()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def watch(self, engine) -> None:
        """The engine is built: signals now stop it cleanly, and so does a failed write of its file."""
        self.engine = engine
        if getattr(engine, "writer", None) is not None:
            engine.writer.on_failure = self._write_failed

    def _handle(self, signum: int, frame) -> None:
        from ..errors import Interrupted

        if self.signum is not None:  # a second signal: now
            if self.world is None:
                os._exit(128 + signum)
            self.world.abort(128 + signum)
        self.signum = signum
        if self.engine is None:
            if self.armed:  # building the engine: nothing to commit yet
                raise Interrupted(signum)
            return  # before the ranks agreed to start: ``check`` reports it there
        self._stop(128 + signum)

    def check(self) -> None:
        """Raise ``Interrupted`` if a signal came while it could only be noted; from here on, raise at once."""
        from ..errors import Interrupted

        self.armed = True
        if self.signum is not None and self.engine is None:
            raise Interrupted(self.signum)

    def _stop(self, code: int) -> None:
        import threading

        if self.world.is_server and self.engine.stop_code == 0:
            self.engine.stop_code = code
        grace = STOP_GRACE_SERVER if self.world.is_server else STOP_GRACE_WORKER
        self._timer = threading.Timer(grace, self._late, args=(code,))
        self._timer.daemon = True
        self._timer.start()

    def _late(self, code: int) -> None:
        import sys

        print(
            f"pfl-mpi: rank {self.world.rank} did not stop within its grace period after {self.signal_name}: "
            "ending the job; the file keeps its committed rounds",
            file=sys.stderr,
            flush=True,
        )
        self.world.abort(code)

    def _write_failed(self, err: Exception) -> None:
        from ..errors import EXIT_WRITE

        self.failure = err
        if self.engine is not None and self.engine.stop_code == 0:
            self.engine.stop_code = EXIT_WRITE
