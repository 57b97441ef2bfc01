"""The ``pfl-mpi`` command (also ``python -m pfl_mpi``).

``run`` validates the configuration first (bad input exits 2 before any rank starts), then
either runs in place (under mpiexec, or as a single process) or, given ``-n P`` outside MPI,
starts itself on P ranks with the venv's own mpiexec.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import traceback
from pathlib import Path

from .errors import ConfigError

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


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfl-mpi", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an experiment (under mpiexec, with -n P, or as one process)")
    run.add_argument("config", nargs="?", help="YAML experiment file (default: built-in defaults)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=0.1 (repeatable)",
    )
    run.add_argument(
        "-n",
        "--ranks",
        type=int,
        default=None,
        metavar="P",
        help="start P MPI ranks with the venv's mpiexec (ignored when already under MPI)",
    )
    run.add_argument("--out", default=None, help="HDF5 run file (default: runs/<name>.h5)")
    run.add_argument(
        "--resume",
        default=None,
        metavar="RUN.h5",
        help="continue an interrupted run from its file (only --set rounds=... may change)",
    )
    run.add_argument("--quiet", action="store_true", help="no per-round progress")

    info = sub.add_parser("info", help="what a run file holds: config, ranks, progress, final metrics")
    info.add_argument("file", help="HDF5 run file")
    return parser


def _resolve_run_config(args: argparse.Namespace):
    """The validated configuration of ``run``, including the data-dependent checks."""
    from .config import apply_overrides, load_config, validate
    from .data import load_federated
    from .models import build_model

    if args.resume:
        import yaml

        from .store import read_config_text

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
    from .comm import relaunch_command

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


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from .comm import make_world, under_mpi

    try:
        cfg = _resolve_run_config(args)
    except ConfigError as err:
        return _fail_config(err)
    if not under_mpi() and args.ranks and args.ranks > 1:
        return _launch(args, argv)

    world = make_world(poll_max=cfg.comm.poll_max_ms / 1000.0)
    try:
        from .runtime import Engine

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
            from .store import read_summary

            rounds = read_summary(cfg.output_path).rounds
            print(
                _summary(engine.last_metrics, (rounds["bytes_down"].sum(), rounds["bytes_up"].sum()), cfg.output_path),
                flush=True,
            )
    return code


def _info(args: argparse.Namespace) -> int:
    from .store import read_summary

    try:
        summary = read_summary(args.file)
    except (OSError, ValueError) as err:
        print(f"pfl-mpi: cannot read {args.file}: {err}", file=sys.stderr)
        return 1
    a, r = summary.attrs, summary.rounds
    print(f"{summary.path}: run '{a['name']}', algorithm {a['algorithm']}, seed {a['seed']}")
    print(
        f"  status {a['status']}, {summary.rounds_completed}/{a['rounds_planned']} rounds completed, "
        f"last written {a.get('updated', '-')}"
    )
    hosts = a["hosts"]
    print(f"  {a['world_size']} rank(s) on {len(set(hosts))} host(s): {', '.join(sorted(set(hosts)))}")
    print("  versions: " + ", ".join(f"{k} {v}" for k, v in a["versions"].items()))
    if summary.rounds_completed:
        evaluated = [i for i, v in enumerate(r.get("test_acc", [])) if not math.isnan(v)]
        if evaluated:
            i = evaluated[-1]
            print(
                f"  last evaluation (round {i + 1}): test accuracy {r['test_acc'][i]:.4f} "
                f"(client mean {r['test_acc_mean'][i]:.4f} +- {r['test_acc_std'][i]:.4f}), "
                f"test loss {r['test_loss'][i]:.4f}"
            )
        print(f"  last train loss {r['train_loss'][-1]:.4f}")
        print(
            f"  bytes moved by the algorithm: down {r['bytes_down'].sum():.3e}, up {r['bytes_up'].sum():.3e}; "
            f"other messages {r['bytes_other'].sum():.3e}"
        )
        print(
            f"  wall time {r['seconds_wall'].sum():.2f} s over {summary.rounds_completed} rounds "
            f"(compute {r['seconds_compute'].sum():.2f} s, server CPU {100 * r['server_cpu'].mean():.1f}% of a core)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _build_parser().parse_args(argv)
    if args.command == "run":
        return _run(args, argv)
    return _info(args)


if __name__ == "__main__":
    sys.exit(main())
