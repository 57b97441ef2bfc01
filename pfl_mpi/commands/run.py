"""Run an experiment: under mpiexec/srun in place, with -n P through the venv's mpiexec, or as one process.

The configuration is validated first, including the data-dependent checks, so bad input exits
2 with one line naming the key before any rank starts.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import traceback
from pathlib import Path

from ..errors import ConfigError

NAME = "run"
HELP = "run an experiment (under mpiexec, with -n P, or as one process)"
EXIT_CONFIG = 2
_RANK_ENV = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def _launcher_rank() -> int:
    """This process's rank as the launcher told it, readable before MPI starts."""
    for name in _RANK_ENV:
        if name in os.environ:
            return int(os.environ[name])
    return 0


def _fail_config(err: ConfigError) -> int:
    if _launcher_rank() == 0:
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
    parser.add_argument("--quiet", action="store_true", help="no per-round progress")


def _resolve_run_config(args: argparse.Namespace):
    """The validated configuration of ``run``, including the data-dependent checks."""
    from ..config import apply_overrides, load_config, validate
    from ..data import load_federated
    from ..models import build_model

    if args.resume:
        import yaml

        from ..store import read_config_text

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
    else:
        cfg = load_config(args.config, args.overrides)
        if args.out:
            cfg.output = args.out
    data = load_federated(cfg.data, cfg.seed)
    build_model(cfg.model, data.input_shape, data.num_classes)
    return cfg


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


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..comm import make_world, under_mpi

    try:
        cfg = _resolve_run_config(args)
    except ConfigError as err:
        return _fail_config(err)
    if not under_mpi() and args.ranks and args.ranks > 1:
        return _launch(args, argv)

    world = make_world(poll_max=cfg.comm.poll_max_ms / 1000.0, wait=cfg.comm.wait)
    try:
        from ..runtime import Engine

        engine = Engine(cfg, world, resume=bool(args.resume), show_progress=not args.quiet)
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
        elif hasattr(engine, "last_metrics"):
            from ..store import read_summary

            rounds = read_summary(cfg.output_path).rounds
            print(
                _summary(engine.last_metrics, (rounds["bytes_down"].sum(), rounds["bytes_up"].sum()), cfg.output_path),
                flush=True,
            )
    return code
