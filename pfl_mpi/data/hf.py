"""Hugging Face data sets from local disk (``name: hf``), offline only.

``data.root`` is a directory written by ``save_to_disk`` (a ``DatasetDict``, with ``dataset_dict.json``, or one
``Dataset``), or a ``.parquet`` / ``.arrow`` file, or a directory of them (files whose names begin with a split
name, e.g. ``train-00000-of-00001.parquet``, go to that split; with no such names every file is training data).
Columns and splits: ``data.hf`` (``x``, ``y``, ``client``, ``train_split``, ``test_split``, ``val_split``).

Needs the ``datasets`` package (``pip install 'pfl_mpi[hf]'``), imported only here and only with
``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1``: nothing is looked up on the hub. Arrow data are memory-mapped
and parquet files are read by column and row group (``ParquetSplit``), so start-up reads the label (and client)
columns only; a client's rows are read and decoded when it is built. Images (``Image`` features) become float32
[C, H, W] in [0, 1]; numeric columns are used as they are.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pfl_mpi.data.config import DataConfig
from pfl_mpi.data.files import TEST, TRAIN, VAL, client_codes
from pfl_mpi.data.tagged import Tagged
from pfl_mpi.errors import ConfigError

KEY = "data.root"
INSTALL = "pip install 'pfl_mpi[hf]' (or: pip install datasets)"


def _datasets() -> Any:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.name", f"hf needs the Hugging Face 'datasets' package: {INSTALL}") from None
    datasets.disable_progress_bars()
    return datasets


def _files(root: Path, suffix: str) -> list[Path]:
    return sorted(root.glob(f"*{suffix}")) if root.is_dir() else ([root] if root.suffix == suffix else [])


def _splits(cfg: DataConfig, root: Path) -> dict[str, Any]:
    """split name -> Dataset, as on disk."""
    ds = _datasets()
    if root.is_dir() and ((root / "dataset_dict.json").is_file() or (root / "state.json").is_file()):
        try:
            loaded = ds.load_from_disk(str(root))
        except Exception as exc:
            raise ConfigError(KEY, f"cannot read {root} with load_from_disk: {type(exc).__name__}: {exc}") from exc
        return dict(loaded) if isinstance(loaded, ds.DatasetDict) else {cfg.hf.train_split: loaded}
    parquet, arrow = _files(root, ".parquet"), _files(root, ".arrow")
    if not parquet and not arrow:
        raise ConfigError(
            KEY,
            f"no {root / 'dataset_dict.json'} nor {root / 'state.json'} (a save_to_disk directory), nor .parquet / "
            f".arrow files at {root}",
        )
    if parquet and arrow:
        raise ConfigError(KEY, f"{root} holds both .parquet and .arrow files: keep one format")
    names = [n for n in (cfg.hf.train_split, cfg.hf.test_split, cfg.hf.val_split) if n]
    groups: dict[str, list[Path]] = {}
    for path in parquet + arrow:
        split = next((n for n in names if path.name.startswith(n)), None)
        groups.setdefault(split or "", []).append(path)
    if any(groups.keys() - {""}) and "" in groups:
        raise ConfigError(KEY, f"{root}: files {[p.name for p in parquet + arrow]} do not all begin with a split name")
    if set(groups) == {""}:
        groups = {cfg.hf.train_split: groups[""]}
    if parquet:
        return {name: ParquetSplit(ds, paths) for name, paths in groups.items()}
    opened = {name: [_open_arrow(ds, path) for path in paths] for name, paths in groups.items()}
    return {name: parts[0] if len(parts) == 1 else ds.concatenate_datasets(parts) for name, parts in opened.items()}


def _open_arrow(ds: Any, path: Path) -> Any:
    try:
        return ds.Dataset.from_file(str(path))  # memory-mapped
    except Exception as exc:
        raise ConfigError(KEY, f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


class ParquetSplit:
    """One split's parquet files, never read whole: a column when asked (labels and client ids, at start-up), and
    the rows of a client from the row groups that hold them (``rows``), decoded with the files' features."""

    def __init__(self, ds: Any, paths: list[Path]):
        import pyarrow.parquet as pq

        try:
            self.files = [pq.ParquetFile(path, memory_map=True) for path in paths]
        except Exception as exc:
            raise ConfigError(KEY, f"cannot read {paths[0].parent} as parquet: {type(exc).__name__}: {exc}") from exc
        schema = self.files[0].schema_arrow
        self.features = ds.Features.from_arrow_schema(schema)
        self.column_names = list(schema.names)
        self.groups = [(f, g) for f in self.files for g in range(f.num_row_groups)]
        self.starts = np.cumsum([0, *(f.metadata.row_group(g).num_rows for f, g in self.groups)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def column(self, name: str) -> np.ndarray:
        parts = [f.read(columns=[name]).column(0).to_numpy(zero_copy_only=False) for f in self.files]
        return np.concatenate(parts) if parts else np.empty(0)

    def rows(self, rows: np.ndarray, name: str) -> list[Any]:
        """The values of column ``name`` in ``rows`` (in that order), decoded (an ``Image`` to an array)."""
        which = np.searchsorted(self.starts, rows, side="right") - 1
        out: list[Any] = [None] * len(rows)
        feature = self.features[name]
        for g in np.unique(which):
            file, group = self.groups[g]
            mine = np.flatnonzero(which == g)
            values = file.read_row_group(group, columns=[name]).column(0).take(rows[mine] - self.starts[g])
            for i, value in zip(mine, values.to_pylist(), strict=True):
                out[i] = np.asarray(feature.decode_example(value)) if hasattr(feature, "decode_example") else value
        return out


def _column(dataset: Any, name: str, key: str, split: str) -> np.ndarray:
    if name not in dataset.column_names:
        raise ConfigError(key, f"split {split!r} has no column {name!r} (it has: {', '.join(dataset.column_names)})")
    if isinstance(dataset, ParquetSplit):
        return np.asarray(dataset.column(name))
    return np.asarray(dataset.data.column(name).to_numpy(zero_copy_only=False))


def _as_x(values: Any, column: str) -> np.ndarray:
    """Decoded rows -> float32 [n, ...]; images [n, H, W(, C)] uint8 -> [n, C, H, W] in [0, 1]. Rows that are
    not numbers of one shape are a ConfigError on ``data.hf.x``."""
    try:
        if isinstance(values, list):
            values = np.stack([np.asarray(v) for v in values])
        x = np.asarray(values)
        if x.dtype == np.uint8 and x.ndim in (3, 4):  # decoded images
            x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
            return x.astype(np.float32) / 255.0
        if x.dtype == object:
            x = np.stack([np.asarray(v, dtype=np.float32) for v in x])
        x = x.astype(np.float32)
    except (TypeError, ValueError) as exc:
        raise ConfigError("data.hf.x", f"column {column!r} is not numbers of one shape per row: {exc}") from exc
    return x[:, None] if x.ndim == 1 else x


class HfReader:
    """x of rows over the splits (train, then val, then test), decoded per split from the memory-mapped data."""

    def __init__(self, parts: list[Any], column: str):
        self.parts = [p if isinstance(p, ParquetSplit) else p.with_format("numpy") for p in parts]
        self.column = column
        self.starts = np.cumsum([0, *(len(p) for p in parts)])
        self.shape: tuple[int, ...] | None = None

    def _values(self, part: Any, rows: np.ndarray) -> Any:
        if isinstance(part, ParquetSplit):
            return part.rows(rows, self.column)
        return part[rows.tolist()][self.column]

    def read(self, rows: np.ndarray) -> np.ndarray:
        which = np.searchsorted(self.starts, rows, side="right") - 1
        out: np.ndarray | None = None
        for i in np.unique(which):
            mask = which == i
            x = _as_x(self._values(self.parts[i], rows[mask] - self.starts[i]), self.column)
            if self.shape is None:
                self.shape = x.shape[1:]  # the data set's, from its first row (read at start-up)
            if x.shape[1:] != self.shape:
                raise ConfigError(
                    "data.hf.x", f"column {self.column!r} has rows of shape {x.shape[1:]} beside rows of "
                    f"{self.shape}: every x must have one shape (resize the images first)",
                )  # fmt: skip
            if out is None:
                out = np.empty((len(rows), *x.shape[1:]), dtype=np.float32)
            out[mask] = x
        return out if out is not None else np.empty((0,), dtype=np.float32)


def read(cfg: DataConfig) -> Tagged:
    """Labels, split and client ids of every row under ``data.root``; x is decoded when a client is built."""
    root = Path(cfg.root or "").expanduser()
    if not root.exists():
        raise ConfigError(KEY, f"no {root}: expected a save_to_disk directory or .parquet / .arrow files")
    hf = cfg.hf
    found = _splits(cfg, root)
    wanted = [(hf.train_split, TRAIN), (hf.val_split, VAL), (hf.test_split, TEST)]
    if hf.train_split not in found:
        raise ConfigError("data.hf.train_split", f"{root} has no split {hf.train_split!r} (it has: {', '.join(found)})")
    present = [(name, code) for name, code in wanted if name and name in found]
    parts, codes = [found[name] for name, _ in present], [code for _, code in present]
    y = np.concatenate([_column(found[name], hf.y, "data.hf.y", name) for name, _ in present])
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise ConfigError("data.hf.y", f"column {hf.y!r} must hold integer labels 0..C-1")
    split = np.concatenate([np.full(len(p), c, dtype=np.int8) for p, c in zip(parts, codes, strict=True)])
    client, names = None, None
    if hf.client is not None:
        ids = np.concatenate([_column(p, hf.client, "data.hf.client", "all") for p in parts])
        client, names = client_codes(ids, len(ids), "data.hf.client")
    if hf.x not in parts[0].column_names:
        raise ConfigError("data.hf.x", f"no column {hf.x!r} (columns: {', '.join(parts[0].column_names)})")
    reader = HfReader(parts, hf.x)
    shape = tuple(int(s) for s in reader.read(np.zeros(1, dtype=np.int64)).shape[1:])
    feature = parts[0].features.get(hf.y)
    classes = len(feature.names) if hasattr(feature, "names") else int(y.max()) + 1
    return Tagged(y.astype(np.int64), split, client, names, classes, shape, reader.read)
