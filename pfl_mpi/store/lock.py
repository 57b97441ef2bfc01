"""One writer per run file: an exclusive ``flock`` on a side file ``<run file>.lock``, held for the run's life.

The side file exists before the run file does (two runs creating the same file collide on it) and holds
the holder's host and pid, so a refused writer can say who has the file. The kernel drops the lock when
its process dies, SIGKILL included; a stale side file is taken over. The holder removes the side file
when it releases the lock; a taker checks that the file it locked is still the one at the path.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..errors import ConfigError

TAKE_SECONDS = 1.0  # a lock briefly held by a reader's probe (``holder``) is retried this long


class RunFileBusy(RuntimeError):
    """Another live process holds the run file's lock."""

    def __init__(self, path: Path, holder: dict | None):
        who = f"pid {holder.get('pid')} on host {holder.get('host')}" if holder else "another process"
        super().__init__(f"{path} is in use by {who} (a run is writing it); wait for it to end or stop it first")
        self.path, self.holder = path, holder


def lock_path(path: str | Path) -> Path:
    """The side file that carries ``path``'s lock."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _read_holder(fd: int) -> dict | None:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


class RunLock:
    """The exclusive lock of one run file. ``acquire`` raises :class:`RunFileBusy` when it is held."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.side = lock_path(self.path)
        self.fd: int | None = None

    def acquire(self, patience: float = TAKE_SECONDS) -> RunLock:
        deadline = time.monotonic() + patience
        while True:
            try:
                fd = os.open(self.side, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:  # a directory of that name, a file system that refuses it, ...
                raise ConfigError("output", f"cannot create the lock file {self.side}: {err.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _read_holder(fd)
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                if time.monotonic() >= deadline:
                    raise RunFileBusy(self.path, holder) from None
                time.sleep(0.05)
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(self.side).st_ino
            except FileNotFoundError:  # its holder removed it while we waited: take a fresh one
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode(), 0)
            self.fd = fd
            return self

    def release(self) -> None:
        """Remove the side file and drop the lock (idempotent)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.side)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(path: str | Path) -> dict | None:
    """Who holds ``path``'s lock ({"host", "pid"}), or None when nobody does. Takes a shared lock for an
    instant, never creates the side file."""
    try:
        fd = os.open(lock_path(path), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read_holder(fd) or {"host": "?", "pid": "?"}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
