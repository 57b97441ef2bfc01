"""The run file's life on rank 0: checking the output path, creating the file with its description and
partition, reopening it to continue, noting a resume, and closing it with the status its exit code says.

The engine calls ``create_run_file`` / ``reopen_run_file`` / ``close_run_file``; ``pfl-mpi run`` calls
``check_output`` before any rank starts and holds the file's ``RunLock`` (``store/lock.py``) for the run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import h5py
import numpy as np

from ..errors import EXIT_DIVERGED, EXIT_WRITE, INTERRUPT_CODES, ConfigError
from .layout import FORMAT
from .lock import RunFileBusy, holder
from .writer import RunFileDamaged, RunWriter

KEY = "output"


def status_of(code: int) -> str:
    """The file's final ``status`` for a run that ends with exit code ``code``."""
    if code == EXIT_DIVERGED:
        return "diverged"
    if code in INTERRUPT_CODES:
        return "interrupted"
    if code == EXIT_WRITE:
        return "running"  # as a killed run's: the writer could not write anything more
    return "completed" if code == 0 else "failed"


def is_run_file(path: Path) -> bool:
    """True when ``path`` opens as a pfl_mpi run file (read-only, without taking HDF5's lock)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return f.attrs.get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _writable_dir(path: Path) -> None:
    """Refuse an output whose directory cannot be made or written (nothing is created here)."""
    parent = path.parent if str(path.parent) else Path(".")
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(KEY, f"{existing} is not a directory (output {path})")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only(existing) else "permission denied"
        raise ConfigError(KEY, f"cannot write in {existing} ({why}): choose another --out")


def make_parent(path: Path) -> None:
    """Make the output's directory (and parents)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(KEY, f"cannot make the directory {path.parent} for {path}: {err.strerror}") from None


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_output(path: Path, *, continuing: bool, overwrite: bool, probe_lock: bool = True) -> None:
    """Refuse an output path that cannot be this run's file, with one line naming it (``ConfigError``):
    a directory, an unwritable directory, a live run's file, an existing file that is not a run file, a path
    the system refuses (a name too long, ...), or (starting afresh without ``overwrite``) any existing file.
    ``probe_lock=False``: the caller holds the lock."""
    try:
        _check_output(path, continuing, overwrite, probe_lock)
    except OSError as err:
        raise ConfigError(KEY, f"{path}: {err.strerror or err}") from None


def _check_output(path: Path, continuing: bool, overwrite: bool, probe_lock: bool) -> None:
    if path.is_dir():
        raise ConfigError(KEY, f"{path} is a directory, not a run file path")
    busy = holder(path) if probe_lock else None
    if busy:
        raise ConfigError(KEY, str(RunFileBusy(path, busy)))
    _writable_dir(path)
    if not path.exists():
        if continuing:
            raise ConfigError("resume", f"no such run file: {path}")
        return
    if not path.is_file():
        raise ConfigError(KEY, f"{path} exists and is not a regular file")
    if not is_run_file(path):
        raise ConfigError(KEY, f"{path} exists and is not a pfl_mpi run file: move it away or choose another --out")
    if not continuing and not overwrite:
        raise ConfigError(
            KEY,
            f"{path} exists ({_progress(path)}): --overwrite replaces it, --resume {path} continues it",
        )


def _progress(path: Path) -> str:
    with h5py.File(path, "r", locking=False) as f:
        return (
            f"status {f.attrs.get('status')}, {f.attrs.get('rounds_completed')}/{f.attrs.get('rounds_planned')} rounds"
        )


def check_reopenable(path: Path) -> None:
    """Open ``path`` for writing once, with HDF5's own lock, as the resume will: a program that holds it
    open (a notebook reading it with the lock) or a damaged file is refused here, in one line."""
    try:
        with h5py.File(path, "r+") as f:
            done = int(f.attrs["rounds_completed"])
    except OSError as err:
        if "lock" in str(err).lower():
            raise ConfigError(
                "resume", f"{path} is open in another program that holds HDF5's file lock: close it first"
            ) from None
        raise ConfigError("resume", f"cannot open {path} for writing: {err}") from None
    except KeyError:
        raise ConfigError("resume", f"{path} has no rounds_completed attribute: not a run file") from None
    with h5py.File(path, "r", locking=False) as f:
        try:
            from .writer import _verify

            _verify(f, done)
        except RunFileDamaged as err:
            raise ConfigError("resume", str(err)) from None


def create_run_file(
    cfg,
    world,
    data,
    histograms: np.ndarray,
    host: np.ndarray,
    layout,
    init_client_state: Callable[[int], Mapping[str, object]],
    extra_attrs: Mapping[str, object] | None = None,
) -> RunWriter:
    """A new run file for ``cfg`` with its description, partition and every client's initial state."""
    import importlib.metadata

    import torch

    from .. import __version__
    from ..comm import FIELDS, LABELS
    from ..runtime.cluster import job_attributes
    from ..runtime.record import RANK_FIELDS

    attrs = {
        "name": cfg.name,
        "config": cfg.to_yaml(),
        "algorithm": cfg.algorithm["name"],
        "seed": cfg.seed,
        "rounds_planned": cfg.rounds,
        "num_clients": data.num_clients,
        "world_size": world.size,
        "hosts": world.hosts,
        **job_attributes(),  # SLURM job, GPUs
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "comm_labels": list(LABELS),
        "comm_fields": list(FIELDS),
        "rank_fields": list(RANK_FIELDS),
        "versions": {
            "pfl_mpi": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "h5py": h5py.__version__,
            "mpi4py": importlib.metadata.version("mpi4py"),
        },
        **(extra_attrs or {}),
    }
    partition = {
        "train_sizes": data.train_sizes,
        "test_sizes": data.test_sizes,
        "label_histograms": histograms,
        "host_rank": host,
        **getattr(data, "partition_columns", dict)(),  # client names, validation sizes (data sets that have them)
        **layout.partition(),
    }

    def init_state(k: int) -> dict[str, np.ndarray]:
        return {name: v.numpy() for name, v in init_client_state(k).items()}

    return RunWriter.create(cfg.output_path, attrs, partition, layout.tables(), init_state, data.num_clients)


def reopen_run_file(cfg) -> tuple[RunWriter, int]:
    """Reopen ``cfg``'s run file to continue it with ``cfg``'s plan: (writer, rounds completed)."""
    plan = {"rounds_planned": cfg.rounds, "config": cfg.to_yaml()}
    return RunWriter.reopen(cfg.output_path, plan)


def close_run_file(writer: RunWriter | None, code: int) -> None:
    """Close the writer with the status of exit code ``code`` (no writer: nothing to do)."""
    if writer is not None:
        writer.close(status_of(code))


def note_resume(path: Path, entry: Mapping[str, object]) -> None:
    """Append ``entry`` (when, where, from which round) to the file's ``resumes`` list."""
    with h5py.File(path, "r+") as f:
        resumes = json.loads(f.attrs.get("resumes", "[]"))
        f.attrs["resumes"] = json.dumps([*resumes, dict(entry)])
