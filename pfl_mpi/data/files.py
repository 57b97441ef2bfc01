"""The user's own data: one .npz or .h5/.hdf5 file with arrays x, y and optionally client and split.

``inspect_file`` validates the file and reads only its small arrays (labels or targets, client ids) and x's shape;
``FileReader`` reads rows of x when a client is materialised. y holds integer class labels, or with
``values=True`` (``data.targets: values``) real-valued regression targets, [n] or [n, k], read as float32.
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


# x's shape and dtype, y, the client ids and the split tags if any: what a file holds, before validation
_Raw = tuple[tuple[int, ...], np.dtype, np.ndarray, np.ndarray | None, np.ndarray | None]

TRAIN, VAL, TEST = 0, 1, 2  # split codes
SPLIT_CODES = {"train": TRAIN, "val": VAL, "validation": VAL, "valid": VAL, "test": TEST}


@dataclass(frozen=True)
class FileInfo:
    """What partitioning needs from a file, read without loading x."""

    path: Path
    kind: Literal["npz", "h5"]
    input_shape: tuple[int, ...]
    y: np.ndarray  # int64 [n] labels, or float32 [n] / [n, k] targets (values)
    client: np.ndarray | None  # int64 [n] codes 0..U-1 (ordered like the ids) or None
    num_classes: int  # labels: C; values: the number of target values per sample (1 for y [n])
    client_names: list[str] | None = None  # the id of each code, as text
    split: np.ndarray | None = None  # int8 [n]: TRAIN, VAL or TEST per sample, or None


def inspect_file(path_str: str, values: bool = False) -> FileInfo:
    """Validate ``path_str`` and read its labels (``values``: real-valued targets) and client ids; raises
    ``ConfigError('data.path', ...)``."""
    path = Path(path_str).expanduser()
    suffix = path.suffix.lower()
    if suffix not in _NPZ + _H5:
        raise ConfigError(KEY, f"{path_str!r} must end in .npz, .h5 or .hdf5")
    if not path.is_file():
        raise ConfigError(KEY, f"no such file: {path_str}")
    try:
        if suffix in _NPZ:
            kind: Literal["npz", "h5"] = "npz"
            x_shape, x_dtype, y, client, split = _inspect_npz(path)
        else:
            kind = "h5"
            x_shape, x_dtype, y, client, split = _inspect_h5(path)
    except ConfigError:
        raise
    except Exception as exc:  # a corrupt or foreign file: say which and why, in one line
        raise ConfigError(KEY, f"cannot read {path_str}: {type(exc).__name__}: {exc}") from exc
    return _validated(path, kind, x_shape, x_dtype, y, client, split, values)


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
        split = np.asarray(npz["split"]) if "split" in names else None
    return x_shape, x_dtype, y, client, split


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
        split = f["split"][()] if "split" in names else None
    return x_shape, x_dtype, np.asarray(y), _optional(client), _optional(split)


def _optional(a: object) -> np.ndarray | None:
    return None if a is None else np.asarray(a)


def _validated(
    path: Path,
    kind: Literal["npz", "h5"],
    x_shape: tuple[int, ...],
    x_dtype: np.dtype,
    y: np.ndarray,
    client: np.ndarray | None,
    split: np.ndarray | None = None,
    values: bool = False,
) -> FileInfo:
    if len(x_shape) < 2:
        raise ConfigError(KEY, f"x must have shape [n, ...] with at least one feature axis, got {x_shape}")
    if not (np.issubdtype(x_dtype, np.floating) or np.issubdtype(x_dtype, np.integer)):
        raise ConfigError(KEY, f"x must hold real numbers, got dtype {x_dtype}")
    n = x_shape[0]
    if n == 0:
        raise ConfigError(KEY, f"{path} holds no samples (x has shape {x_shape})")
    if values:
        y = _targets(y, n)
        width = 1 if y.ndim == 1 else int(y.shape[1])
    else:
        y = _labels(y, n)
        width = int(y.max()) + 1
    codes, names = (None, None) if client is None else client_codes(client, n)
    tags = None if split is None else split_codes(split, n)
    shape = tuple(int(s) for s in x_shape[1:])
    return FileInfo(path, kind, shape, y, codes, width, names, tags)


def _labels(y: np.ndarray, n: int) -> np.ndarray:
    if np.issubdtype(y.dtype, np.floating):
        raise ConfigError(
            KEY,
            f"y must hold integer class labels, got dtype {y.dtype} (real-valued targets: set data.targets: values "
            "and task: regression)",
        )
    y = _int_vector(y, "y", n)
    if y.min() < 0:
        raise ConfigError(KEY, f"y must hold labels 0..C-1, found {int(y.min())}")
    return y


def _targets(y: np.ndarray, n: int) -> np.ndarray:
    """Real-valued targets (``data.targets: values``): y [n] or [n, k] of finite numbers, as float32."""
    if y.ndim not in (1, 2) or y.shape[0] != n or (y.ndim == 2 and y.shape[1] == 0):
        raise ConfigError(KEY, f"y must have shape [{n}] or [{n}, k] like x's first axis, got {y.shape}")
    if not (np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer)):
        raise ConfigError(KEY, f"y must hold real numbers (data.targets: values), got dtype {y.dtype}")
    y = y.astype(np.float32)
    bad = ~np.isfinite(y.reshape(n, -1)).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise ConfigError(KEY, f"y has NaN or infinite values (or values beyond float32), e.g. in row {row}")
    return y


def _int_vector(a: np.ndarray, name: str, n: int) -> np.ndarray:
    _check_length(a, name, n)
    if not np.issubdtype(a.dtype, np.integer):
        raise ConfigError(KEY, f"{name} must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64)


def _check_length(a: np.ndarray, name: str, n: int) -> None:
    if a.ndim != 1 or a.shape[0] != n:
        raise ConfigError(KEY, f"{name} must have shape [{n}] like x's first axis, got {a.shape}")


def _texts(a: np.ndarray) -> np.ndarray | None:
    """``a`` as an array of str when it holds text (unicode, bytes, or objects that are all str/bytes)."""
    if a.dtype.kind == "U":
        return a
    if a.dtype.kind == "S":
        return np.char.decode(a, "utf-8")
    if a.dtype.kind == "O" and all(isinstance(v, str | bytes) for v in a):
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else v for v in a], dtype=str)
    return None


def client_codes(a: np.ndarray, n: int, key: str = KEY) -> tuple[np.ndarray, list[str]]:
    """Integer or string client ids -> (codes int64 [n], the id of each code as text); code k is the k-th
    smallest distinct id (numbers compare as numbers, strings as strings)."""
    _check_length(a, "client", n)
    text = _texts(a)
    if text is None and not np.issubdtype(a.dtype, np.integer):
        raise ConfigError(key, f"client must hold integers or strings, got dtype {a.dtype}")
    ids, codes = np.unique(a if text is None else text, return_inverse=True)
    return codes.reshape(-1).astype(np.int64), [str(i) for i in ids.tolist()]


def split_codes(a: np.ndarray, n: int, key: str = KEY) -> np.ndarray:
    """Split tags (strings train / val / validation / test, or integers 0 / 1 / 2) -> int8 codes."""
    _check_length(a, "split", n)
    text = _texts(a)
    if text is None:
        if not np.issubdtype(a.dtype, np.integer) or (len(a) and (a.min() < 0 or a.max() > 2)):
            raise ConfigError(key, "split must hold train / val / test (or 0 / 1 / 2) per sample")
        return a.astype(np.int8)
    found, inverse = np.unique(text, return_inverse=True)
    unknown = sorted(set(found.tolist()) - set(SPLIT_CODES))
    if unknown:
        raise ConfigError(key, f"split holds {unknown[0]!r}; expected train, val (or validation) or test")
    return np.array([SPLIT_CODES[t] for t in found.tolist()], dtype=np.int8)[inverse.reshape(-1)]


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
