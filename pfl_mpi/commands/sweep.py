"""Run a grid of experiments on this machine (configs x --set-grid values x seeds), then the grouped report.

The grid is the one ``pfl-mpi slurm`` turns into a job array (``pfl_mpi.grid``), every task validated
before any starts (a bad key exits 2 with one line). Each task is ``pfl-mpi run ... --out
RUNS_DIR/<task>.h5 --resume-if-exists`` in a process of its own (``-n P`` ranks each, ``--jobs J`` at
once), its output in RUNS_DIR/logs/<task>.log. A file that already holds the task's experiment
completed (or diverged) is skipped; an interrupted one is continued from its last round; a file holding
another experiment fails that task. At the end: ``pfl-mpi report`` of the sweep's files into
RUNS_DIR/report (runs that differ only in seed grouped; the grid's keys, or --by, are the compared
ones). Exit 0 when every task ended well, else 1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import ConfigError
from ..grid import add_grid_arguments
from ..tuning import SELECT_ON

NAME = "sweep"
HELP = "run a grid of configs x --set-grid values x seeds here (-n P ranks, --jobs J at once), then report"
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130
FINISHED = ("completed", "diverged")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_grid_arguments(parser, "experiment(s)", "run")
    parser.add_argument("-n", "--ranks", type=int, default=1, metavar="P", help="MPI ranks of each run (default 1)")
    parser.add_argument("--jobs", type=int, default=1, metavar="J", help="runs at once (default 1)")
    parser.add_argument("--runs-dir", default="runs/sweep", help="run files, logs and report (default runs/sweep)")
    parser.add_argument(
        "-o", "--report", default=None, metavar="DIR", help="report directory (default RUNS_DIR/report)"
    )
    parser.add_argument(
        "--by", action="append", default=[], metavar="KEY", help="the compared key (report --by; default: the grid's)"
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs and what would happen, run nothing")
    parser.add_argument("--no-report", action="store_true", help="skip the grouped report at the end")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the tasks inside J long-lived worker processes (one rank each) instead of one process per run: "
        "Python and torch start J times, not once per run (small runs are mostly start-up)",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="tune: each config's algorithm's tuning_grid (a --set-grid key replaces its values in the grids that "
        "declare it, or is added to every grid if none does), evaluated on "
        "data.eval_on [val, test]; the best point on --tune-metric goes to RUNS_DIR/tuning.json (docs/tuning.md)",
    )
    parser.add_argument(
        "--tune-metric",
        default=SELECT_ON,
        metavar="METRIC",
        help=f"--tune: the validation metric chosen on, mean over seeds (default {SELECT_ON}; *loss, *mse: lowest)",
    )


def state_of(path: Path, cfg) -> str:
    """``new`` (no file), ``completed``/``diverged`` (its experiment, ended), ``partial`` (its experiment,
    to continue) or ``other`` (another experiment or not a run file: ``pfl-mpi run`` will say which)."""
    import yaml

    from ..store import read_summary

    if not path.exists():
        return "new"
    try:
        summary = read_summary(path)
        stored = yaml.safe_load(str(summary.attrs["config"]))
    except (OSError, ValueError, KeyError):
        return "other"
    mine = cfg.model_dump(mode="json")
    if _comparable(stored) != _comparable(mine):
        return "other"
    status = str(summary.attrs.get("status"))
    if status in FINISHED and summary.rounds_completed >= cfg.rounds and stored.get("rounds") == cfg.rounds:
        return status
    return "partial"


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("rounds", "output")}


def _command(task, out: Path, ranks: int) -> list[str]:
    sets = [x for o in task.overrides for x in ("--set", o)]
    command = [sys.executable, "-m", "pfl_mpi", "run", str(task.config), *sets, "--out", str(out)]
    command += ["--resume-if-exists", "--quiet"]
    return command + (["-n", str(ranks)] if ranks > 1 else [])


def _run_one(command: list[str], log: Path) -> tuple[int, float]:
    start = time.monotonic()
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(command)}\n".encode())
        f.flush()
        code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return code, time.monotonic() - start


def run_in_this_process(command: list[str], log: str) -> tuple[int, float]:
    """``_run_one`` inside a long-lived worker (--in-process): ``pfl-mpi run`` called here, its output (this
    process's stdout and stderr, redirected for the call) appended to ``log``. Saves starting Python and
    importing torch for every run; the run file is the same (a run is a function of its config and seed)."""
    import os
    import traceback

    from ..cli import main

    start = time.monotonic()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(command)}  (in a sweep worker)\n".encode())
        f.flush()
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            code = main(command[3:])  # after: python -m pfl_mpi
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except Exception:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    return code, time.monotonic() - start


def _check(args: argparse.Namespace) -> None:
    for name in ("ranks", "jobs"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name}", f"must be at least 1, not {getattr(args, name)}")
    if args.in_process and args.ranks > 1:
        raise ConfigError("--in-process", f"runs each task in a worker process of one rank: drop -n {args.ranks}")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..config import load_config
    from ..grid import expand, parse_grid

    runs_dir = Path(args.runs_dir)
    try:
        _check(args)
        tasks = (
            _tuning_tasks(args)
            if args.tune
            else expand(args.configs, args.overrides, parse_grid(args.grid), args.seeds)
        )
        states = [state_of(runs_dir / f"{t.name}.h5", load_config(t.config, t.overrides)) for t in tasks]
    except ConfigError as err:
        print(f"pfl-mpi: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    logs = runs_dir / "logs"
    todo = []
    width = len(str(len(tasks)))
    for i, (task, state) in enumerate(zip(tasks, states, strict=True), start=1):
        out = runs_dir / f"{task.name}.h5"
        if state in FINISHED:
            print(f"[{i:>{width}}/{len(tasks)}] {task.name}: {state}, skipped ({out})", flush=True)
            continue
        verb = {"new": "start", "partial": "continue"}.get(state, "run")  # other: pfl-mpi run says why not
        todo.append((i, task, out, verb))
        if args.dry_run:
            print(f"[{i:>{width}}/{len(tasks)}] {task.name}: would {verb} {out}")
    if args.dry_run:
        return 0
    logs.mkdir(parents=True, exist_ok=True)

    workers = None
    if args.in_process:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        workers = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))

    def work(item) -> tuple[str, int]:
        i, task, out, verb = item
        log = logs / f"{task.name}.log"
        command = _command(task, out, args.ranks)
        if workers is None:
            code, seconds = _run_one(command, log)
        else:
            code, seconds = workers.submit(run_in_this_process, command, str(log)).result()
        result = "done" if code == 0 else f"FAILED (exit {code}), log {log}"
        done = {"start": "started", "continue": "continued"}.get(verb, "ran")
        print(f"[{i:>{width}}/{len(tasks)}] {task.name}: {done}, {result} in {seconds:.1f} s", flush=True)
        return task.name, code

    try:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(work, todo))
    except KeyboardInterrupt:  # the runs got the signal too; their files keep every completed round
        print("pfl-mpi: sweep interrupted: the same command continues it", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if workers is not None:
            workers.shutdown(cancel_futures=True)
    failed = [name for name, code in results if code]
    files = [runs_dir / f"{t.name}.h5" for t in tasks if t.name not in failed]
    code = 1 if failed else 0
    if failed:
        print(f"pfl-mpi: {len(failed)} of {len(tasks)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    if files and not args.no_report:
        by = args.by or list(dict.fromkeys(key for t in tasks for key in t.point))  # the grid's keys are compared
        code = max(code, _report(files, Path(args.report) if args.report else runs_dir / "report", by))
    if args.tune:
        code = max(code, _choose(tasks, runs_dir, args.tune_metric))
    return code


def _tuning_tasks(args: argparse.Namespace) -> list:
    """--tune: every config with its algorithm's grid (merged with --set-grid), evaluated on val and test."""
    from ..grid import expand, number_repeated_names, parse_grid
    from ..tuning import eval_overrides, merge_grids, tuning_grid_for

    overrides = eval_overrides(args.overrides)
    declared = [tuning_grid_for(config, overrides) for config in args.configs]
    anywhere = {key for grid in declared for key, _ in grid}
    tasks = []
    for config, grid in zip(args.configs, declared, strict=True):
        mine = {key for key, _ in grid}  # a key some grid declares replaces its values there only
        given = [(key, values) for key, values in parse_grid(args.grid) if key in mine or key not in anywhere]
        tasks += expand([config], overrides, merge_grids(grid, given), args.seeds)
    return number_repeated_names(tasks)


def _choose(tasks: list, runs_dir: Path, metric: str) -> int:
    """--tune: each config's trials scored on ``metric`` from the run files, the best point printed and written
    to RUNS_DIR/tuning.json. 1 when a config has no scored trial."""
    from ..config import load_config
    from ..tuning import choose, record, score_trials, write_record

    by_config: dict[Path, dict[tuple, list[Path]]] = {}
    names: dict[Path, str] = {}  # each config's run name
    for task in tasks:
        points = by_config.setdefault(task.config, {})
        points.setdefault(tuple(task.point.items()), []).append(runs_dir / f"{task.name}.h5")
        names.setdefault(task.config, load_config(task.config, task.overrides, schema_only=True).name)
    records, code = {}, 0
    for config, points in by_config.items():
        name = names[config]
        trials = score_trials([(dict(point), files) for point, files in points.items()], metric)
        print(f"tuning {name} ({config.name}) on {metric}, {len(trials)} trial(s):")
        for trial in trials:
            values = " ".join(f"{k}={v}" for k, v in trial.point.items())
            notes = f"  [{'; '.join(trial.notes)}]" if trial.notes else ""
            print(f"  {values:<40} {metric} {trial.score:.4f}   (test {trial.test:.4f}, not used){notes}")
        try:
            best = choose(trials, metric)
        except ValueError as err:
            print(f"pfl-mpi: {name}: {err}", file=sys.stderr)
            code = 1
            continue
        records[name] = record(str(config), metric, trials, best)
        print(f"best: {' '.join('--set ' + s for s in records[name]['set'])}  ({metric} {best.score:.4f})")
    if records:
        write_record(runs_dir / "tuning.json", records)
        print(f"tuning: {runs_dir / 'tuning.json'}")
    return code


def _report(files: list[Path], out: Path, by: list[str]) -> int:
    from ..report import make_report
    from .report import print_summary

    try:
        report = make_report(files, out, by=by)
    except (OSError, ValueError, KeyError) as err:
        print(f"pfl-mpi: cannot report on the sweep: {err}", file=sys.stderr)
        return 1
    print_summary(report)
    print(f"report: {out / 'report.md'}")
    return 0
