"""Write a ready SLURM batch script for an experiment, or a job array sweeping configs and seeds; --submit sends it.

One config and at most one seed make a plain job; several configs, --set-grid values or seeds make a job
array, one task per (config, grid point, seed) (``pfl_mpi.grid``, shared with ``pfl-mpi sweep``), chosen
by SLURM_ARRAY_TASK_ID. Every configuration is validated first (exit 2, one line). Without GPUs the job
has --ntasks-per-node ranks on each node; with --gpus-per-node G it has one rank per GPU plus the server
rank (G+1 task slots per node, srun --distribution=cyclic, so every node hosts G workers). Logs are named
%x-%j.out (%x-%A_%a.out for arrays), run files <name>-<job id>.h5 (<name>-s<seed>-<array job id>_<task
id>.h5); a requeued job continues its run file. The log directory is created with the script; site
set-up and modules come before ``set -u`` (Lmod fails under it), and srun gets the allocation's
--cpus-per-task through SRUN_CPUS_PER_TASK. See docs/slurm.md.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..grid import Task, add_grid_arguments, expand, parse_grid

NAME = "slurm"
HELP = "write (and --submit) a SLURM batch script for an experiment or a sweep of configs and seeds"
EXIT_CONFIG = 2
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM(:SS)
_ARRAY = re.compile(r"^(\d+(-\d+(:\d+)?)?)(,\d+(-\d+(:\d+)?)?)*(%\d+)?$")
_JOB_NAME = re.compile(r"[^A-Za-z0-9_.+-]")


@dataclass
class Job:
    """Everything the script says. Paths are absolute, so the script can be submitted from anywhere."""

    tasks: list[Task]
    job_name: str
    venv: Path
    runs_dir: Path
    logs_dir: Path
    command: str
    nodes: int = 1
    ntasks_per_node: int = 4
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    array: str | None = None  # which tasks of the sweep run, and how many at once (Slurm's --array syntax)
    requeue: bool = True
    launcher: str = "srun --mpi=pmi2"
    modules: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    sbatch_options: list[str] = field(default_factory=list)

    @property
    def is_array(self) -> bool:
        return len(self.tasks) > 1

    @property
    def log_pattern(self) -> str:
        return str(self.logs_dir / ("%x-%A_%a.out" if self.is_array else "%x-%j.out"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_grid_arguments(parser, "experiment(s); several make a job array", "task", " (a job array)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument(
        "--ntasks-per-node", type=int, default=None, metavar="T", help="CPU jobs: ranks per node (default 4)"
    )
    parser.add_argument(
        "--gpus-per-node", type=int, default=0, metavar="G", help="G GPUs per node: one worker rank each + the server"
    )
    parser.add_argument(
        "--cpus-per-task", type=int, default=1, metavar="C", help="cores per rank, also its torch threads (default 1)"
    )
    parser.add_argument("--time", default="01:00:00", help="time limit, Slurm syntax (default 01:00:00)")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument(
        "--array", default=None, metavar="SPEC", help="which sweep tasks run and how many at once, e.g. 0-9%%2 or 3,7"
    )
    parser.add_argument("--job-name", default=None, help="default: the config's name (pfl-sweep for arrays)")
    parser.add_argument(
        "--launcher", default="srun --mpi=pmi2", help="what starts the ranks (default 'srun --mpi=pmi2'; or mpiexec)"
    )
    parser.add_argument("--module", dest="modules", action="append", default=[], help="module load this (repeatable)")
    parser.add_argument(
        "--setup", action="append", default=[], metavar="LINE", help="a shell line run before (repeatable)"
    )
    parser.add_argument(
        "--sbatch-option",
        dest="sbatch_options",
        action="append",
        default=[],
        metavar="OPTION",
        help="another #SBATCH directive, e.g. --sbatch-option=--qos=debug (repeatable)",
    )
    parser.add_argument("--venv", default=sys.prefix, help="Python environment of the job (default: this one)")
    parser.add_argument("--runs-dir", default="runs", help="where the run files go (default runs)")
    parser.add_argument("--logs-dir", default=None, help="where the job logs go (default RUNS_DIR/logs)")
    parser.add_argument("--no-requeue", action="store_true", help="do not let SLURM requeue the job")
    parser.add_argument(
        "-o", "--script", default=None, help="script file (default RUNS_DIR/jobs/<job name>.sbatch; - for stdout)"
    )
    parser.add_argument(
        "--submit", action="store_true", help="check everything (algorithm keys, data) and submit with sbatch"
    )


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}", f"must be at least 1, not {value}")


def _array_indices(spec: str) -> list[int]:
    """The task indices of a Slurm --array spec (without its %limit)."""
    indices = []
    for part in spec.split("%")[0].split(","):
        bounds, _, step = part.partition(":")
        first, _, last = bounds.partition("-")
        indices += list(range(int(first), int(last or first) + 1, int(step or 1)))
    return indices


def _tasks(args: argparse.Namespace) -> list[Task]:
    """Every (config, grid point, seed) task of the job, validated (``pfl_mpi.grid``): fully before a
    submission; without --submit only the schema, so that writing a script does not wait for torch."""
    overrides = list(args.overrides)
    if args.cpus_per_task > 1:
        overrides.append(f"threads={args.cpus_per_task}")
    if args.gpus_per_node and not any(o.partition("=")[0].strip() == "device" for o in args.overrides):
        overrides.append("device=cuda")  # a GPU job without a visible GPU fails instead of using the CPU
    return expand(args.configs, overrides, parse_grid(args.grid), args.seeds, schema_only=not args.submit)


def build_job(args: argparse.Namespace, argv: list[str]) -> Job:
    """The job the options describe (``argv``: the command line, quoted in the script); raises ConfigError
    naming the option at fault."""
    _positive(args, "nodes", "ntasks_per_node", "cpus_per_task")
    if args.gpus_per_node < 0:
        raise ConfigError("--gpus-per-node", f"must be 0 or more, not {args.gpus_per_node}")
    if args.gpus_per_node and args.ntasks_per_node:
        raise ConfigError("--ntasks-per-node", "GPU jobs have one rank per GPU (and the server): leave it out")
    if not _TIME.match(args.time):
        raise ConfigError("--time", f"{args.time!r} is not a Slurm time (minutes, HH:MM:SS or D-HH:MM:SS)")
    if not args.launcher.split():
        raise ConfigError("--launcher", "is empty")
    if args.script == "-" and args.submit:
        raise ConfigError("--script", "- writes to stdout: sbatch needs a file to submit")
    tasks = _tasks(args)
    if args.array is not None:
        if not _ARRAY.match(args.array):
            raise ConfigError("--array", f"{args.array!r} is not a Slurm array spec such as 0-9, 1,4 or 0-9%2")
        if len(tasks) == 1:
            raise ConfigError("--array", "this job has one task: give several configs or --seeds to sweep")
        if re.search(r":0*(,|%|$)", args.array):
            raise ConfigError("--array", f"{args.array!r}: a step must be at least 1")
        beyond = [i for i in _array_indices(args.array) if i >= len(tasks)]
        if beyond:
            raise ConfigError("--array", f"task {beyond[0]} does not exist: the sweep has tasks 0-{len(tasks) - 1}")
    name = args.job_name or (tasks[0].name if len(tasks) == 1 else "pfl-sweep")
    runs_dir = Path(args.runs_dir).resolve()
    return Job(
        tasks=tasks,
        job_name=_JOB_NAME.sub("_", name),
        nodes=args.nodes,
        ntasks_per_node=args.ntasks_per_node or 4,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        partition=args.partition,
        account=args.account,
        array=args.array or (f"0-{len(tasks) - 1}" if len(tasks) > 1 else None),
        requeue=not args.no_requeue,
        launcher=args.launcher,
        modules=args.modules,
        setup=args.setup,
        sbatch_options=args.sbatch_options,
        venv=Path(args.venv).resolve(),
        runs_dir=runs_dir,
        logs_dir=Path(args.logs_dir).resolve() if args.logs_dir else runs_dir / "logs",
        command=shlex.join(["pfl-mpi", *argv]),
    )


def _directives(job: Job) -> list[str]:
    lines = [f"--job-name={job.job_name}", f"--nodes={job.nodes}"]
    if job.gpus_per_node:
        lines += [f"--gpus-per-node={job.gpus_per_node}", f"--ntasks-per-node={job.gpus_per_node + 1}"]
    else:
        lines.append(f"--ntasks-per-node={job.ntasks_per_node}")
    lines += [f"--cpus-per-task={job.cpus_per_task}", f"--time={job.time}"]
    lines += [f"--{key}={value}" for key, value in (("partition", job.partition), ("account", job.account)) if value]
    if job.array:
        lines.append(f"--array={job.array}")
    lines.append(f"--output={job.log_pattern}")
    if job.requeue:
        lines += ["--requeue", "--open-mode=append"]
    lines += job.sbatch_options
    return [f"#SBATCH {line}" for line in lines]


def _task_lines(job: Job) -> list[str]:
    """Shell that sets RUN (the run's arguments), NAME and OUT for this job or array task."""
    q = shlex.quote
    if not job.is_array:
        task = job.tasks[0]
        args = " ".join(q(a) for a in [str(task.config), *(x for o in task.overrides for x in ("--set", o))])
        return [f"RUN=({args})", f'OUT="$RUNS_DIR"/{q(task.name)}-"$SLURM_JOB_ID".h5']
    lines = ['case "${SLURM_ARRAY_TASK_ID:?submit this script with sbatch: it is a job array}" in']
    for i, task in enumerate(job.tasks):
        args = " ".join(q(a) for a in [str(task.config), *(x for o in task.overrides for x in ("--set", o))])
        lines.append(f"{i}) RUN=({args}) NAME={q(task.name)} ;;")
    lines += [
        f'*) echo "pfl-mpi: no task $SLURM_ARRAY_TASK_ID: this sweep has tasks 0-{len(job.tasks) - 1}" >&2; exit 2 ;;',
        "esac",
        'OUT="$RUNS_DIR/$NAME-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}.h5"',
    ]
    return lines


def render(job: Job) -> str:
    """The batch script's text."""
    q = shlex.quote
    kind = (
        f"{job.nodes} node(s) x ({job.gpus_per_node} GPU workers), plus the server rank"
        if job.gpus_per_node
        else f"{job.nodes} node(s) x {job.ntasks_per_node} ranks"
    )
    sweep = f", a job array of {len(job.tasks)} tasks (config x grid point x seed)" if job.is_array else ""
    lines = [
        "#!/bin/bash",
        f"# pfl_mpi job: {kind}{sweep}.",
        f"# Written {time.strftime('%Y-%m-%d %H:%M')} by: {job.command}",
        "# Submit with: sbatch THIS_FILE. A requeued job continues its run file (docs/slurm.md).",
        *_directives(job),
        "set -eo pipefail",
        "# site set-up first: Lmod's module command fails under set -u",
        *job.setup,
        *([f"module load {' '.join(q(m) for m in job.modules)}"] if job.modules else []),
        "set -u",
        "",
        f"PFL_MPI_VENV=${{PFL_MPI_VENV:-{q(str(job.venv))}}}",
        f"RUNS_DIR={q(str(job.runs_dir))}",
        f"LAUNCHER=({' '.join(q(word) for word in shlex.split(job.launcher))})",
    ]
    lines += [
        "if [[ ${LAUNCHER[0]} == *srun ]]; then",
        "    LAUNCHER+=(--kill-on-bad-exit=1) # a rank that dies ends the whole step at once",
        "    # a requeued job numbers its steps from 0 again and MPICH names its shared memory after the step:",
        "    # one throwaway step per earlier attempt keeps the killed attempt's segments out of MPI_Init",
        "    for ((i = 0; i < ${SLURM_RESTART_COUNT:-0}; i++)); do srun -n 1 -N 1 true; done",
        "fi",
    ]
    lines += [
        f"export OMP_NUM_THREADS={job.cpus_per_task}",
        "# srun (Slurm >= 22.05) does not take --cpus-per-task from the allocation: say it again",
        f"export SRUN_CPUS_PER_TASK={job.cpus_per_task}",
    ]
    if job.gpus_per_node:
        lines += [
            "# one rank per GPU of every node, plus the server (rank 0); cyclic placement puts the server and",
            "# G workers on the first node and G workers on each other one, each bound to a GPU by node-local rank",
            f"GPUS=${{SLURM_GPUS_ON_NODE:-{job.gpus_per_node}}}",
            "RANKS=$((SLURM_JOB_NUM_NODES * GPUS + 1))",
            'if [[ ${LAUNCHER[0]} == *srun ]]; then LAUNCHER+=(-N "$SLURM_JOB_NUM_NODES" --distribution=cyclic); fi',
        ]
    else:
        lines.append("RANKS=$SLURM_NTASKS")
    lines += _task_lines(job)
    lines += [
        'mkdir -p "$RUNS_DIR"',
        'echo "pfl-mpi: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:'
        ' $RANKS ranks -> $OUT"',
        '"${LAUNCHER[@]}" -n "$RANKS" "$PFL_MPI_VENV/bin/python" -m pfl_mpi run "${RUN[@]}" --out "$OUT" '
        "--resume-if-exists",
    ]
    return "\n".join(lines) + "\n"


def _submit(script: Path, job: Job) -> int:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        print("pfl-mpi: sbatch not found: submit from a SLURM login node (the script is written)", file=sys.stderr)
        return 1
    done = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode:
        print(f"pfl-mpi: sbatch failed: {done.stderr.strip() or done.stdout.strip()}", file=sys.stderr)
        return done.returncode
    job_id = done.stdout.strip().split(";")[0]
    ids = f"{job_id}_<task>" if job.is_array else job_id
    log = job.log_pattern.replace("%x", job.job_name).replace("%A_%a", ids).replace("%j", ids)
    print(f"submitted job {job_id}: log {log}")
    return 0


def run(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        job = build_job(args, argv)
    except ConfigError as err:
        print(f"pfl-mpi: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    try:  # SLURM does not create the log directory: a job whose log cannot be opened fails without a word
        job.logs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"pfl-mpi: config error: --logs-dir: cannot create {job.logs_dir}: {err.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    text = render(job)
    if args.script == "-":
        sys.stdout.write(text)
        return 0
    script = Path(args.script) if args.script else job.runs_dir / "jobs" / f"{job.job_name}.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    script.chmod(0o755)
    print(f"wrote {script}")
    return _submit(script, job) if args.submit else 0
