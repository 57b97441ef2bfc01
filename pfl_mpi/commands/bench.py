"""Benchmarks. ``bench comm``: an OSU-style sweep of the collectives the runtime uses (Bcast, Reduce,
Allreduce, Gatherv, Scatterv, rooted at rank 0, buffer methods) against pickled point-to-point
messages and numpy's in-memory add, an alpha-beta fit per operation, and for each --config the
predicted communication time of one training round next to the one measured by running it.

Runs under mpiexec/srun on the ranks it is given, or starts itself with -n P. See docs/communication.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..comm.world import POLL_MAX_MS, WAIT_MODES
from ..errors import ConfigError

NAME = "bench"
HELP = "benchmarks: 'bench comm' sweeps the MPI collectives, fits t = alpha + beta*n, predicts rounds"
DEFAULT_SIZES = ("8", "64", "512", "4K", "32K", "256K", "2M", "16M", "64M")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True)
    comm = sub.add_parser("comm", help="collectives vs message size; alpha-beta fit; round prediction")
    comm.add_argument(
        "--sizes",
        nargs="+",
        default=list(DEFAULT_SIZES),
        metavar="N",
        help="payload bytes per rank (suffix K, M, G: powers of 1024); default 8 B .. 64 MiB",
    )
    comm.add_argument("--repeats", type=int, default=5, help="timed calls per size and operation (median kept)")
    comm.add_argument(
        "--wait",
        choices=WAIT_MODES,
        default=WAIT_MODES[0],
        help="how the sweep's calls complete (comm.wait; default: as the runtime's default)",
    )
    comm.add_argument(
        "--poll-max-ms",
        type=float,
        default=POLL_MAX_MS,
        metavar="MS",
        help=f"polled wait: longest sleep between polls (comm.poll_max_ms, default {POLL_MAX_MS:g})",
    )
    comm.add_argument(
        "--out", default=None, metavar="FILE.h5", help="result file (default runs/bench-comm-P<ranks>.h5)"
    )
    comm.add_argument("--plot", default=None, metavar="FILE.png", help="also draw time against size, log-log")
    comm.add_argument(
        "--config", action="append", default=[], metavar="CONFIG.yaml", help="predict and measure a round of it"
    )
    comm.add_argument("--run", action="append", default=[], metavar="RUN.h5", help="compare against this run file")
    comm.add_argument("--rounds", type=int, default=5, help="rounds of each --config to run (>= 3)")
    comm.add_argument(
        "-n", "--ranks", type=int, default=None, metavar="P", help="start P ranks with the venv's mpiexec"
    )


def _check(args: argparse.Namespace):
    """Parsed sizes and validated configs (before any rank starts)."""
    from ..config import load_config
    from ..costmodel.report import parse_size
    from ..data import load_federated
    from ..runtime.build import check_buildable

    try:
        sizes = sorted({parse_size(s) for s in args.sizes})
    except ValueError as err:
        raise ConfigError("--sizes", str(err)) from None
    if args.repeats < 1:
        raise ConfigError("--repeats", "must be at least 1")
    if args.poll_max_ms <= 0:
        raise ConfigError("--poll-max-ms", "must be positive")
    if args.rounds < 3:
        raise ConfigError("--rounds", "at least 3 (round 0 and the last, evaluated one are not compared)")
    for path in args.run:
        if not Path(path).is_file():
            raise ConfigError("--run", f"no such file: {path}")
    configs = [
        load_config(path, [f"rounds={args.rounds}", f"eval_every={args.rounds + 1}", "state_every=0"])
        for path in args.config
    ]
    for cfg in configs:  # the data-dependent checks of ``run``, before any rank starts
        check_buildable(cfg, load_federated(cfg.data, cfg.seed))
    return sizes, configs


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..comm import under_mpi
    from .run import _fail_config, _launch

    try:
        sizes, configs = _check(args)
    except ConfigError as err:
        return _fail_config(err)
    if not under_mpi():
        if not args.ranks or args.ranks < 2:
            print("pfl-mpi: bench comm needs at least 2 ranks: give -n P or run it under mpiexec", file=sys.stderr)
            return 2
        return _launch(args, argv)
    from ..comm import make_world

    world = make_world(poll_max=args.poll_max_ms / 1000, wait=args.wait)
    try:
        return _comm(args, world, sizes, configs)
    except Exception:
        import traceback

        print(f"pfl-mpi: rank {world.rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        world.abort(1)
        return 1


def _fresh_ledger(world) -> None:
    from ..comm import Ledger

    resolver = world.ledger.resolve_entries
    world.ledger = Ledger()
    world.ledger.resolve_entries = resolver


def _say(world, text: str) -> None:
    if world.rank == 0:
        print(text, flush=True)


def _comm(args: argparse.Namespace, world, sizes: list[int], configs: list) -> int:
    import os

    from ..comm.sweep import NOTICE_BYTES, OPS, Sweep, library_versions
    from ..config import validate
    from ..costmodel import measured_round, predict_round, round_messages
    from ..costmodel.report import (
        fit_all,
        fit_table,
        interpolated,
        notice_table,
        plot,
        prediction_table,
        sweep_table,
        wake_terms,
        write_h5,
    )
    from ..runtime import Engine
    from ..store import read_config_text

    if world.size < 2:
        _say(world, "pfl-mpi: bench comm needs at least 2 ranks")
        return 2
    out = Path(args.out or f"runs/bench-comm-P{world.size}.h5")
    started = time.perf_counter()
    sweep = Sweep(world)
    times = sweep.run(sizes, args.repeats)
    notice = sweep.notice(args.repeats)
    elapsed = time.perf_counter() - started
    fits = fit_all(sizes, times) if world.rank == 0 else {}
    wake = wake_terms(notice, fits, NOTICE_BYTES) if world.rank == 0 else {}
    waits = f"{args.wait} completion"
    if args.wait == "polled":
        waits += f" (polls up to {args.poll_max_ms:g} ms apart)"
    hosts = sorted(set(world.hosts))
    versions = library_versions()
    versions["mpi_library"] = " ".join(versions["mpi_library"].split())
    _say(
        world,
        f"## bench comm: {world.size} ranks on {len(hosts)} host(s) ({', '.join(hosts)}), {versions['mpi_library']}\n"
        f"rooted at rank 0, {waits}, median of {args.repeats} after a warm-up; a call's time is "
        f"the slowest rank's; sizes are bytes per rank; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; sweep took {elapsed:.1f} s\n",
    )
    if world.rank == 0:
        print(sweep_table(sizes, times) + "\n\nalpha-beta fit, t = alpha + beta * bytes:\n\n" + fit_table(fits) + "\n")
        print(
            f"a waiting rank's notice delay: one rank enters {NOTICE_BYTES}-byte calls late, the others wait; "
            "time from its entry until the last of them sees completion (wake = that minus the fit):\n\n"
            + notice_table(notice, wake)
            + "\n"
        )

    predictions = []
    runs = [(cfg.name, cfg, None) for cfg in configs] + [(Path(p).stem, None, p) for p in args.run]
    for name, cfg, path in runs:
        if cfg is not None:
            cfg.output = str(out.with_name(f"{out.stem}-{cfg.name}.h5"))
            path = cfg.output_path
            world.barrier()
            _fresh_ledger(world)  # nothing from the sweep or an earlier config counts in this run
            world.poll_max, world.blocking = cfg.comm.poll_max_ms / 1000, cfg.comm.wait == "blocking"
            Engine(cfg, world, show_progress=False).run()
            world.poll_max, world.blocking = args.poll_max_ms / 1000, args.wait == "blocking"
        if world.rank != 0:
            continue
        if cfg is None:
            import yaml

            cfg = validate(yaml.safe_load(read_config_text(path)))
        measured, rounds, size = measured_round(path)
        note = "" if size == world.size else f" (run on {size} ranks, fit on {world.size}: not comparable)"
        if (cfg.comm.wait, cfg.comm.poll_max_ms) != (args.wait, args.poll_max_ms):
            note += f" (the run waits {cfg.comm.wait}, poll_max_ms {cfg.comm.poll_max_ms:g}: not the sweep's wake)"
        waited = {label: m["waiting"] / m["calls"] for label, m in measured.items()}
        messages = round_messages(cfg, size, t=rounds[0])
        predicted = predict_round(
            messages, fits, interpolated(sizes, times), wake, waited, poll_max=cfg.comm.poll_max_ms / 1000
        )
        print(prediction_table(f"{name}, {cfg.algorithm['name']}, {path}, rounds {rounds}{note}", predicted, measured))
        print()
        predictions.append(
            {"name": name, "file": str(path), "rounds": rounds, "predicted": predicted, "measured": measured}
        )
    if world.rank == 0:
        attrs = {
            "ranks": world.size,
            "hosts": list(world.hosts),
            "versions": versions,
            "wait": args.wait,
            "poll_max_ms": args.poll_max_ms,
            "timing": "median over repeats of the slowest rank's seconds; bytes per rank",
            "operations": list(OPS),
            "clock_error": float(world.clock_error),
        }
        write_h5(out, sizes, times, fits, attrs, predictions, notice, wake)
        print(f"wrote {out}")
        if args.plot:
            plot(Path(args.plot), sizes, times, fits, f"{world.size} ranks, {versions['mpi_library']}")
            print(f"wrote {args.plot}")
    return 0
