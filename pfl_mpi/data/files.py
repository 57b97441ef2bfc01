"""The user's own data: one .npz or .h5/.hdf5 file with arrays x, y and optionally client.

``inspect_file`` validates the file and reads only its small arrays (labels, client ids) and x's shape;
``FileReader`` reads rows of x when a client is materialised.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pfl_mpi.errors import ConfigError

KEY = "data.path"
_NPZ = (".npz",)
_H5 = (".h5", ".hdf5")


# x's shape and dtype, y, and the client ids if any: what a file holds, before validation
_Raw = tuple[tuple[int, ...], np.dtype, np.ndarray, np.ndarray | None]


@dataclass(frozen=True)
class FileInfo:
    """What partitioning needs from a file, read without loading x."""

    path: Path
    kind: Literal["npz", "h5"]
    input_shape: tuple[int, ...]
    y: np.ndarray  # int64 [n]
    client: np.ndarray | None  # int64 [n] or None
    num_classes: int


def inspect_file(path_str: str) -> FileInfo:
    """Validate ``path_str`` and read its labels and client ids; raises ``ConfigError('data.path', ...)``."""
    path = Path(path_str).expanduser()
    suffix = path.suffix.lower()
    if suffix not in _NPZ + _H5:
        raise ConfigError(KEY, f"{path_str!r} must end in .npz, .h5 or .hdf5")
    if not path.is_file():
        raise ConfigError(KEY, f"no such file: {path_str}")
    try:
        if suffix in _NPZ:
            kind: Literal["npz", "h5"] = "npz"
            x_shape, x_dtype, y, client = _inspect_npz(path)
        else:
            kind = "h5"
            x_shape, x_dtype, y, client = _inspect_h5(path)
    except ConfigError:
        raise
    except Exception as exc:  # a corrupt or foreign file: say which and why, in one line
        raise ConfigError(KEY, f"cannot read {path_str}: {type(exc).__name__}: {exc}") from exc
    return _validated(path, kind, x_shape, x_dtype, y, client)


def _missing(path: Path, name: str, found: list[str]) -> ConfigError:
    return ConfigError(KEY, f"{path} has no array {name!r} (it has: {', '.join(sorted(found)) or 'nothing'})")


def _npy_header(archive: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array in an .npz, from its header alone."""
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # rare format versions: fall back to reading the array
            f.seek(0)
            arr = np.lib.format.read_array(f, allow_pickle=False)
            shape, dtype = arr.shape, arr.dtype
    return tuple(shape), np.dtype(dtype)


def _inspect_npz(path: Path) -> _Raw:
    with zipfile.ZipFile(path) as archive:
        names = [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
    for required in ("x", "y"):
        if required not in names:
            raise _missing(path, required, names)
    with zipfile.ZipFile(path) as archive:
        x_shape, x_dtype = _npy_header(archive, "x.npy")
    with np.load(path, allow_pickle=False) as npz:
        y = np.asarray(npz["y"])
        client = np.asarray(npz["client"]) if "client" in names else None
    return x_shape, x_dtype, y, client


def _inspect_h5(path: Path) -> _Raw:
    import h5py

    with h5py.File(path, "r") as f:
        names = [k for k in f.keys() if isinstance(f[k], h5py.Dataset)]
        for required in ("x", "y"):
            if required not in names:
                raise _missing(path, required, names)
        x_shape, x_dtype = tuple(f["x"].shape), f["x"].dtype
        y = f["y"][()]
        client = f["client"][()] if "client" in names else None
    return x_shape, x_dtype, np.asarray(y), None if client is None else np.asarray(client)


def _validated(
    path: Path,
    kind: Literal["npz", "h5"],
    x_shape: tuple[int, ...],
    x_dtype: np.dtype,
    y: np.ndarray,
    client: np.ndarray | None,
) -> FileInfo:
    if len(x_shape) < 2:
        raise ConfigError(KEY, f"x must have shape [n, ...] with at least one feature axis, got {x_shape}")
    if not (np.issubdtype(x_dtype, np.floating) or np.issubdtype(x_dtype, np.integer)):
        raise ConfigError(KEY, f"x must hold real numbers, got dtype {x_dtype}")
    n = x_shape[0]
    if n == 0:
        raise ConfigError(KEY, f"{path} holds no samples (x has shape {x_shape})")
    y = _int_vector(y, "y", n)
    if y.min() < 0:
        raise ConfigError(KEY, f"y must hold labels 0..C-1, found {int(y.min())}")
    if client is not None:
        client = _int_vector(client, "client", n)
    return FileInfo(path, kind, tuple(int(s) for s in x_shape[1:]), y, client, int(y.max()) + 1)


def _int_vector(a: np.ndarray, name: str, n: int) -> np.ndarray:
    if a.ndim != 1 or a.shape[0] != n:
        raise ConfigError(KEY, f"{name} must have shape [{n}] like x's first axis, got {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ConfigError(KEY, f"{name} must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64)


class FileReader:
    """Reads rows of x as float32. An .npz is read whole on first use (zip members cannot be sliced);
    an .h5 is read row by row, so each rank reads only its own clients."""

    def __init__(self, info: FileInfo):
        self.info = info
        self._x: np.ndarray | None = None

    def read(self, indices: np.ndarray) -> np.ndarray:
        if self.info.kind == "npz":
            if self._x is None:
                with np.load(self.info.path, allow_pickle=False) as npz:
                    self._x = np.asarray(npz["x"], dtype=np.float32)
            rows = self._x[indices]
        else:
            rows = self._read_h5(indices)
        bad = ~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)
        if bad.any():
            raise ConfigError(KEY, f"x has NaN or infinite values, e.g. in row {int(indices[bad][0])}")
        return rows

    def _read_h5(self, indices: np.ndarray) -> np.ndarray:
        import h5py

        order = np.argsort(indices, kind="stable")
        sorted_idx = indices[order]
        with h5py.File(self.info.path, "r") as f:
            ds = f["x"]
            lo, hi = int(sorted_idx[0]), int(sorted_idx[-1]) + 1
            if hi - lo <= 4 * len(sorted_idx):  # nearly contiguous: one slab read is faster than a selection
                rows = ds[lo:hi][sorted_idx - lo]
            else:
                unique, inverse = np.unique(sorted_idx, return_inverse=True)
                rows = ds[unique][inverse]
        out = np.empty((len(indices), *rows.shape[1:]), dtype=np.float32)
        out[order] = rows
        return out
