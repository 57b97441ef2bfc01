"""Run an experiment: under mpiexec/srun in place, with -n P through the venv's mpiexec, or as one process.

The configuration is validated first, including the data-dependent checks, so bad input exits
2 with one line naming the key before any rank starts. A job whose ranks do not form one MPI world
(srun without a PMI plugin starts singletons) exits 2 with one line before doing anything.

``--resume-if-exists`` continues the output file when it holds the same experiment; a requeued
SLURM job (``SLURM_RESTART_COUNT`` > 0) does so without being asked (docs/slurm.md).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
import traceback
from pathlib import Path

from ..errors import ConfigError
from ..runtime.cluster import launch_mismatch, launcher_rank, requeued

NAME = "run"
HELP = "run an experiment (under mpiexec, with -n P, or as one process)"
EXIT_CONFIG = 2
EXIT_LAUNCH = 2
# seconds the other tasks of a misstarted job wait before failing: srun --kill-on-bad-exit ends the step
# as soon as one task fails, and task 0 must have said why by then
LAUNCH_ERROR_GRACE = 10.0


def _fail_config(err: ConfigError) -> int:
    if launcher_rank() == 0:
        print(f"pfl-mpi: config error: {err}", file=sys.stderr, flush=True)
    return EXIT_CONFIG


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML experiment file (default: built-in defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=0.1 (repeatable)",
    )
    parser.add_argument(
        "-n",
        "--ranks",
        type=int,
        default=None,
        metavar="P",
        help="start P MPI ranks with the venv's mpiexec (ignored when already under MPI)",
    )
    parser.add_argument("--out", default=None, help="HDF5 run file (default: runs/<name>.h5)")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="RUN.h5",
        help="continue an interrupted run from its file (only --set rounds=... may change)",
    )
    parser.add_argument(
        "--resume-if-exists",
        action="store_true",
        help="continue the output file if it holds this experiment (only rounds may differ), else start it; "
        "automatic in a requeued SLURM job",
    )
    parser.add_argument("--quiet", action="store_true", help="no per-round progress")


def _differing_key(stored: dict, new: dict, prefix: str = "") -> str | None:
    """The first dotted key whose value differs between two configurations (``rounds``, ``output`` aside)."""
    for key in sorted(set(stored) | set(new), key=str):
        if not prefix and key in ("rounds", "output"):
            continue
        a, b = stored.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _differing_key(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}"
    return None


def _existing_rounds(cfg) -> int | None:
    """Rounds completed in ``cfg``'s output file if it holds the same experiment; None if there is no file.

    Anything else there (another experiment, not a run file) is a configuration error naming ``output``."""
    import yaml

    from ..store import read_summary

    path = cfg.output_path
    if not path.exists():
        return None
    try:
        summary = read_summary(path)
        stored = yaml.safe_load(str(summary.attrs["config"]))
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError("output", f"{path} exists but is not a readable run file ({err}); move it away") from None
    differs = _differing_key(stored, cfg.model_dump(mode="json"))
    if differs:
        raise ConfigError("output", f"{path} holds another experiment ({differs} differs): cannot continue it")
    return summary.rounds_completed


def _resolve_run_config(args: argparse.Namespace):
    """The validated configuration of ``run``, including the data-dependent checks, and whether it continues
    a run file (``--resume``, or ``--resume-if-exists``/a requeued job finding its file): (cfg, rounds done or None)."""
    from ..config import apply_overrides, load_config, validate
    from ..data import load_federated
    from ..runtime.build import check_buildable

    if args.resume:
        import yaml

        from ..store import read_config_text, read_summary

        if args.config:
            raise ConfigError("config", "give either a config file or --resume RUN.h5, not both")
        try:
            stored = yaml.safe_load(read_config_text(args.resume))
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError("resume", f"cannot read a run configuration from {args.resume}: {err}") from None
        changed = apply_overrides(yaml.safe_load(yaml.safe_dump(stored)), args.overrides)
        if {k: v for k, v in changed.items() if k != "rounds"} != {k: v for k, v in stored.items() if k != "rounds"}:
            raise ConfigError("resume", "only rounds may change when resuming (--set rounds=N)")
        changed["output"] = args.resume
        cfg = validate(changed)
        done = int(read_summary(args.resume).rounds_completed)
    else:
        cfg = load_config(args.config, args.overrides)
        if args.out:
            cfg.output = args.out
        done = _existing_rounds(cfg) if args.resume_if_exists or requeued() else None
    check_buildable(cfg, load_federated(cfg.data, cfg.seed))
    return cfg, done


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Start ``run`` again on ``args.ranks`` ranks; return mpiexec's exit code."""
    from ..comm import relaunch_command

    forwarded, skip = [], False
    for i, token in enumerate(argv):
        if skip:
            skip = False
            continue
        if token in ("-n", "--ranks"):
            skip = True
            continue
        if token.startswith(("--ranks=", "-n=")) or (token.startswith("-n") and token[2:].isdigit() and i):
            continue
        forwarded.append(token)
    try:
        return subprocess.call(relaunch_command(args.ranks, forwarded))
    except FileNotFoundError as err:
        print(f"pfl-mpi: {err}", file=sys.stderr)
        return 1


def _summary(metrics: dict[str, float], totals: tuple[float, float], path: Path) -> str:
    acc = metrics.get("test_acc", math.nan)
    lines = [f"done: {int(metrics['round']) + 1} rounds, wrote {path}"]
    if not math.isnan(acc):
        lines.append(
            f"  final test accuracy {acc:.4f} (client mean {metrics['test_acc_mean']:.4f} "
            f"+- {metrics['test_acc_std']:.4f}), test loss {metrics['test_loss']:.4f}"
        )
    if "finetune_test_acc" in metrics:
        lines.append(f"  after local fine-tuning: test accuracy {metrics['finetune_test_acc']:.4f}")
    lines.append(f"  bytes moved by the algorithm: down {totals[0]:.3e}, up {totals[1]:.3e}")
    return "\n".join(lines)


def _note_resume(path: Path, done: int, world) -> None:
    """Say that the run continues, and append when, where and from which round to the file's ``resumes``."""
    import json

    import h5py

    from ..runtime.cluster import slurm_attributes

    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rounds_completed": done,
        "world_size": world.size,
        "hosts": sorted(set(world.hosts)),
        **slurm_attributes(),
    }
    with h5py.File(path, "r+") as f:
        resumes = json.loads(f.attrs.get("resumes", "[]"))
        f.attrs["resumes"] = json.dumps([*resumes, entry])
    job = (
        f" (SLURM job {entry['slurm_job_id']}, restart {entry['slurm_restart_count']})"
        if "slurm_job_id" in entry
        else ""
    )
    print(f"pfl-mpi: continuing {path} after {done} completed round(s){job}", flush=True)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..comm import make_world, under_mpi

    try:
        cfg, done = _resolve_run_config(args)
    except ConfigError as err:
        return _fail_config(err)
    if not under_mpi() and args.ranks and args.ranks > 1:
        return _launch(args, argv)

    world = make_world(poll_max=cfg.comm.poll_max_ms / 1000.0, wait=cfg.comm.wait)
    mismatch = launch_mismatch(world.size)
    if mismatch:
        if launcher_rank() == 0:
            print(f"pfl-mpi: launch error: {mismatch}", file=sys.stderr, flush=True)
        else:
            time.sleep(LAUNCH_ERROR_GRACE)
        return EXIT_LAUNCH
    if done is not None and world.is_server:  # every rank has read the file: making the world synchronised them
        _note_resume(cfg.output_path, done, world)
    try:
        from ..runtime import Engine

        engine = Engine(cfg, world, resume=done is not None, show_progress=not args.quiet)
        code = engine.run()
    except Exception:
        sys.stdout.flush()
        print(
            f"pfl-mpi: rank {world.rank} of {world.size} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True
        )
        world.abort(1)
        return 1
    if world.is_server:
        if code:
            print(f"pfl-mpi: {engine.divergence}", file=sys.stderr, flush=True)
        elif done is not None and done >= cfg.rounds:
            print(f"done: {cfg.output_path} already had its {cfg.rounds} rounds", flush=True)
        elif hasattr(engine, "last_metrics"):
            from ..store import read_summary

            rounds = read_summary(cfg.output_path).rounds
            print(
                _summary(engine.last_metrics, (rounds["bytes_down"].sum(), rounds["bytes_up"].sum()), cfg.output_path),
                flush=True,
            )
    return code
