"""Run an experiment: under mpiexec/srun in place, with -n P through the venv's mpiexec, or as one process.

The configuration is validated first, including the data-dependent checks, so bad input exits
2 with one line naming the key before any rank starts. A job whose ranks do not form one MPI world
(srun without a PMI plugin starts singletons) exits 2 with one line before doing anything.

``--resume-if-exists`` continues the output file when it holds the same experiment; a requeued
SLURM job (``SLURM_RESTART_COUNT`` > 0) does so without being asked (docs/slurm.md). An existing output
file is replaced only with ``--overwrite``. Rank 0 holds the file's lock (``store/lock.py``) for the run.

Under MPI every rank validates, then all agree (one collective) before the run starts: a failure on any
rank (a plugin missing on one node) ends every rank with one line instead of a hang. SIGTERM or Ctrl-C
stops the run after the round in flight, committed, with status ``interrupted`` (``runtime/cluster.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import (
    EXIT_CONFIG,
    EXIT_DIVERGED,
    EXIT_WRITE,
    INTERRUPT_CODES,
    AgreedConfigError,
    ConfigError,
    Interrupted,
)
from ..report.score_lines import score_lines
from ..runtime.cluster import Stopper, launch_mismatch, launcher_rank, requeued
from ..runtime.novel_record import novel_line
from ..store.writer import RunFileWriteError

if TYPE_CHECKING:
    import numpy as np

NAME = "run"
HELP = "run an experiment (under mpiexec, with -n P, or as one process)"
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
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file (default: refuse it)")
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
    from ..store.lock import RunFileBusy, holder

    path = cfg.output_path
    if not path.exists():
        return None
    busy = holder(path)  # a live run's file: say so, not what its rounds are
    if busy:
        raise ConfigError("output", str(RunFileBusy(path, busy)))
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

    if args.out is not None and not args.out.strip():
        raise ConfigError("output", "--out is empty: give the run file's path")
    if args.resume:
        import yaml

        from ..store import read_config_text, read_summary

        if args.config:
            raise ConfigError("config", "give either a config file or --resume RUN.h5, not both")
        if args.out:
            raise ConfigError(
                "out", f"--resume continues {args.resume} in place: drop --out (copy the file to continue a copy)"
            )
        if args.overwrite or args.resume_if_exists:
            raise ConfigError(
                "resume", "--resume continues its file: it takes neither --overwrite nor --resume-if-exists"
            )
        if Path(args.resume).is_dir():
            raise ConfigError("resume", f"{args.resume} is a directory, not a run file")
        try:
            stored = yaml.safe_load(read_config_text(args.resume))
            done = int(read_summary(args.resume).rounds_completed)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError("resume", f"cannot read a run configuration from {args.resume}: {err}") from None
        changed = apply_overrides(yaml.safe_load(yaml.safe_dump(stored)), args.overrides)
        if {k: v for k, v in changed.items() if k != "rounds"} != {k: v for k, v in stored.items() if k != "rounds"}:
            raise ConfigError("resume", "only rounds may change when resuming (--set rounds=N)")
        changed["output"] = args.resume
        cfg = validate(changed)
    else:
        if args.overwrite and (args.resume_if_exists or requeued()):
            raise ConfigError(
                "overwrite", "--overwrite starts afresh, --resume-if-exists (or a requeued job) continues"
            )
        cfg = load_config(args.config, args.overrides)
        if args.out:
            cfg.output = args.out
        done = _existing_rounds(cfg) if args.resume_if_exists or requeued() else None
    if done is not None and cfg.rounds < done:
        raise ConfigError(
            "rounds",
            f"{cfg.rounds} is fewer than the {done} rounds {cfg.output_path} has completed: rounds can only grow",
        )
    check_buildable(cfg, load_federated(cfg.data, cfg.seed))
    return cfg, done


def _check_start(cfg, done: int | None, args: argparse.Namespace, server: bool, worker: bool) -> None:
    """What can be known before the run starts: the output path (server), the device (workers), the data."""
    from ..store.run_file import check_output, check_reopenable

    if worker and cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "device", "cuda was asked for but no GPU is visible here (device: auto falls back to the CPU)"
            )
    if server:
        check_output(cfg.output_path, continuing=done is not None, overwrite=args.overwrite)
        if done is not None:
            check_reopenable(cfg.output_path)
        _check_finite_data(cfg)


def _check_finite_data(cfg) -> None:
    """A data file's x must be finite: NaN or inf would only show as a NaN loss rounds later."""
    if cfg.data.name != "file" or not cfg.data.path:
        return
    import numpy as np

    path = Path(cfg.data.path).expanduser()
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            blocks = [np.asarray(npz["x"])]
        starts = [0]
    else:
        import h5py

        f = h5py.File(path, "r", locking=False)
        x = f["x"]
        step = max(1, (64 << 20) // max(1, int(np.prod(x.shape[1:], dtype=np.int64)) * x.dtype.itemsize))
        starts = list(range(0, x.shape[0], step))
        blocks = (x[i : i + step] for i in starts)
    for start, block in zip(starts, blocks, strict=False):
        bad = ~np.isfinite(np.asarray(block, dtype=np.float64)).reshape(len(block), -1).all(axis=1)
        if bad.any():
            raise ConfigError(
                "data.path", f"{path}: x has NaN or infinite values (first in sample {start + int(np.argmax(bad))})"
            )


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Start ``run`` again on ``args.ranks`` ranks under the venv's mpiexec; return its exit code."""
    from ..comm import relaunch_command
    from ..comm.launch import supervise

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
        return supervise(relaunch_command(args.ranks, forwarded))
    except FileNotFoundError as err:
        print(f"pfl-mpi: {err}", file=sys.stderr)
        return 1


def _summary(metrics: dict[str, float], rounds: dict[str, np.ndarray], path: Path) -> str:
    """The lines printed after the last round (``rounds``: the run file's per-round table)."""
    lines = [f"done: {int(metrics['round']) + 1} rounds, wrote {path}", *score_lines(metrics, "final")]
    if "finetune_test_acc" in metrics:
        lines.append(f"  after local fine-tuning: test accuracy {metrics['finetune_test_acc']:.4f}")
    lines += [line for line in [novel_line(rounds)] if line]  # data.novel_clients
    if "protocol_bytes_down" in rounds:
        lines.append(
            f"  protocol bytes (the clients' downloads and uploads): down {rounds['protocol_bytes_down'].sum():.3e}, "
            f"up {rounds['protocol_bytes_up'].sum():.3e}, evaluation down {rounds['protocol_bytes_eval'].sum():.3e}"
        )
    if "simulated_time" in rounds:
        lines.append(f"  simulated time: {rounds['simulated_time'][-1]:.1f} s")
    lines.append(
        f"  transport bytes (this simulation's MPI messages): down {rounds['bytes_down'].sum():.3e}, "
        f"up {rounds['bytes_up'].sum():.3e}"
    )
    return "\n".join(lines)


def _note_resume(path: Path, done: int, world) -> None:
    """Say that the run continues, and append when, where and from which round to the file's ``resumes``."""
    from ..runtime.cluster import slurm_attributes
    from ..store.run_file import note_resume

    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rounds_completed": done,
        "world_size": world.size,
        "hosts": sorted(set(world.hosts)),
        **slurm_attributes(),
    }
    note_resume(path, entry)
    job = (
        f" (SLURM job {entry['slurm_job_id']}, restart {entry['slurm_restart_count']})"
        if "slurm_job_id" in entry
        else ""
    )
    print(f"pfl-mpi: continuing {path} after {done} completed round(s){job}", flush=True)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..comm import make_world, under_mpi

    if args.ranks is not None and args.ranks < 1:
        return _fail_config(ConfigError("-n", f"the number of ranks must be at least 1, not {args.ranks}"))
    prepared = None
    if not under_mpi():  # validate once here, before any rank starts
        try:
            prepared = _resolve_run_config(args)
            _check_start(*prepared, args, server=True, worker=True)
        except ConfigError as err:
            return _fail_config(err)
        if args.ranks and args.ranks > 1:
            code = _launch(args, argv)
            if code not in KNOWN_CODES:  # a process of the job was killed: the ranks could not say it
                print(f"pfl-mpi: the job ended with exit code {code} (a process of it was killed); "
                      f"{_kept(prepared[0].output_path)}", file=sys.stderr, flush=True)  # fmt: skip
            return code

    stopper = Stopper()  # from here a signal is noted, and stops the run once it has started
    stopper.install()
    try:
        world = make_world()
        stopper.world = world
        return _start(args, world, prepared, stopper)
    finally:
        stopper.uninstall()


def _start(args: argparse.Namespace, world, prepared, stopper: Stopper) -> int:
    mismatch = launch_mismatch(world.size)
    if mismatch:
        if launcher_rank() == 0:
            print(f"pfl-mpi: launch error: {mismatch}", file=sys.stderr, flush=True)
        else:
            time.sleep(LAUNCH_ERROR_GRACE)
        return EXIT_LAUNCH
    return _run_ranks(args, world, prepared, stopper)


def _prepare(args: argparse.Namespace, world, prepared, stopper: Stopper):
    """Every rank: the configuration and its checks; rank 0: the file's lock. Then all agree, so that a
    failure on any one rank ends every rank with one line. Returns (cfg, done, lock) or an exit code."""
    from ..store.lock import RunFileBusy, RunLock
    from ..store.run_file import check_output, make_parent

    lock, failure = None, None
    try:
        cfg, done = prepared or _resolve_run_config(args)
        if prepared is None:
            _check_start(cfg, done, args, server=world.is_server, worker=world.is_worker)
        world.configure(cfg.comm.poll_max_ms / 1000.0, cfg.comm.wait)
        if world.is_server:
            make_parent(cfg.output_path)
            lock = RunLock(cfg.output_path).acquire()
            check_output(cfg.output_path, continuing=done is not None, overwrite=args.overwrite, probe_lock=False)
        if stopper.signum is not None:
            raise Interrupted(stopper.signum)
    except Interrupted as err:
        failure = f"interrupted: {err}"
    except ConfigError as err:
        failure = f"config error: {err}"
    except RunFileBusy as err:
        failure = f"config error: output: {err}"
    except Exception as err:  # noqa: BLE001 - every rank must hear of it, or the others would wait for ever
        failure = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
    agreed = world.agree(failure)
    if agreed is None:
        return cfg, done, lock
    if lock is not None:
        lock.release()
    rank, text = agreed
    if world.is_server:
        where = f" (rank {rank} of {world.size}, host {world.hosts[rank]})" if rank else ""
        first, _, rest = text.partition("\n")
        print(f"pfl-mpi: {first}{where}" + (f"\n{rest.rstrip()}" if rest.strip() else ""), file=sys.stderr, flush=True)
    if text.startswith("interrupted:"):
        return 128 + (stopper.signum or 15)
    return EXIT_CONFIG if text.startswith("config error:") else 1


def _run_ranks(args: argparse.Namespace, world, prepared, stopper: Stopper) -> int:
    """Run the experiment on this rank: prepare and agree, then the engine, under the stopper's signals."""
    ready = _prepare(args, world, prepared, stopper)
    if isinstance(ready, int):
        return ready
    cfg, done, lock = ready
    engine = None
    try:
        stopper.check()
        if done is not None and world.is_server:  # every rank has read the file: agreeing synchronised them
            _note_resume(cfg.output_path, done, world)
        from ..runtime import Engine

        engine = Engine(cfg, world, resume=done is not None, show_progress=not args.quiet)
        stopper.watch(engine)
        code = engine.run()
    except Interrupted as err:
        if world.is_server:
            print(f"pfl-mpi: {err}; {_kept(cfg.output_path)}", file=sys.stderr, flush=True)
        _release(lock)
        world.abort(err.code)
        return err.code
    except RunFileWriteError as err:  # creating the file, or closing it at the end
        print(f"pfl-mpi: {err}", file=sys.stderr, flush=True)
        _release(lock)
        if engine is None:
            world.abort(EXIT_WRITE)
        world.exit(EXIT_WRITE)
        return EXIT_WRITE
    except AgreedConfigError as err:  # every rank raised it together: none is left waiting in a collective
        if world.is_server:
            where = f" (rank {err.rank} of {world.size}, host {world.hosts[err.rank]})" if err.rank else ""
            print(f"pfl-mpi: config error: {err}{where}", file=sys.stderr, flush=True)
        _release(lock)
        return EXIT_CONFIG
    except Exception:
        sys.stdout.flush()
        print(
            f"pfl-mpi: rank {world.rank} of {world.size} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True
        )
        _release(lock)
        world.abort(1)
        return 1
    finally:
        stopper.uninstall()  # and its grace timer
    _release(lock)
    if not world.is_server:
        return code
    if stopper.failure is not None:
        print(f"pfl-mpi: {stopper.failure}", file=sys.stderr, flush=True)
        world.exit(EXIT_WRITE)  # HDF5 crashes when it closes a file whose flush failed: end before it does
    if code in INTERRUPT_CODES:
        print(
            f"pfl-mpi: stopped by {stopper.signal_name}: {cfg.output_path} keeps {engine.writer.committed} "
            f"committed round(s), status interrupted; continue with: pfl-mpi run --resume {cfg.output_path}",
            file=sys.stderr,
            flush=True,
        )
    elif code:
        print(f"pfl-mpi: {engine.divergence}", file=sys.stderr, flush=True)
    elif done is not None and done >= cfg.rounds:
        print(f"done: {cfg.output_path} already had its {cfg.rounds} rounds", flush=True)
    elif hasattr(engine, "last_metrics"):
        from ..store import read_summary

        rounds = read_summary(cfg.output_path).rounds
        print(_summary(engine.last_metrics, rounds, cfg.output_path), flush=True)
    return code


def _release(lock) -> None:
    if lock is not None:
        lock.release()


# exit codes whose process says why in a line of its own; any other one means a process of the job was killed
KNOWN_CODES = (0, 1, EXIT_CONFIG, EXIT_DIVERGED, EXIT_WRITE, EXIT_LAUNCH, *INTERRUPT_CODES)


def _kept(path: Path) -> str:
    """What an interrupted start leaves: nothing, or a file to continue."""
    if path.exists():
        return f"{path} keeps its committed rounds; continue with: pfl-mpi run --resume {path}"
    return "no run file was written"
