"""LEAF's FEMNIST and Shakespeare (Caldas et al. 2018) from LEAF's json layout.

``data.root`` is LEAF's ``data/<name>/data``: ``train/*.json`` and ``test/*.json``, each file
``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...], "y": [...]}}}``. Client k is the k-th
user of the training files (files in name order, users in file order): LEAF's natural partition with its own
per-user train/test split; the user ids are kept as ``FederatedData.client_names``.

- FEMNIST: x is 784 floats per sample (a 28 x 28 image, used as given), y a class 0..61 (62 classes).
- Shakespeare: x is an 80-character string, y the next character; both map to ids in LEAF's 80-letter
  vocabulary (``VOCAB``), so x is int64 [80] token ids and y one of 80 classes.

json cannot be read in part: start-up parses every file once for its labels and keeps only them; building a
client parses its user's files again and keeps the user's samples. The parsed samples of the last two files (a
train and a test file) are kept until other files are needed (``release`` drops them), so building clients in
increasing order parses each file once per rank.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pfl_mpi.data.config import DataConfig
from pfl_mpi.data.files import TEST, TRAIN
from pfl_mpi.data.tagged import Tagged
from pfl_mpi.errors import ConfigError

KEY = "data.root"
VOCAB = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"  # LEAF's ALL_LETTERS
SEQ_LEN = 80
_LOOKUP = np.full(256, -1, dtype=np.int64)  # code point -> token id (every VOCAB character is ASCII)
_LOOKUP[[ord(c) for c in VOCAB]] = np.arange(len(VOCAB))
FEMNIST_CLASSES = 62
HOW = "LEAF's preprocessed json (see docs/data.md, 'LEAF')"


def encode(text: str, where: str) -> np.ndarray:
    """Token ids of ``text`` in LEAF's vocabulary; ConfigError for a character outside it."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    ids = np.where(codes < 256, _LOOKUP[np.minimum(codes, 255)], -1)
    if (ids < 0).any():
        bad = text[int(np.flatnonzero(ids < 0)[0])]
        raise ConfigError(KEY, f"{where}: character {bad!r} is not in LEAF's Shakespeare vocabulary")
    return ids


@dataclass
class _Rows:
    """Where each user's samples sit: (file, user) per block of rows."""

    files: list[Path] = field(default_factory=list)
    block_file: list[int] = field(default_factory=list)
    block_user: list[str] = field(default_factory=list)
    starts: list[int] = field(default_factory=lambda: [0])


def _json_files(root: Path, split: str) -> list[Path]:
    folder = root / split
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise ConfigError(KEY, f"no {folder}/*.json: expected {HOW} in {root}")
    return files


def _parse(path: Path) -> dict:
    try:
        with path.open("r", encoding="utf-8") as f:
            data = json.load(f)
        users, num, user_data = data["users"], data["num_samples"], data["user_data"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(KEY, f"cannot read {path} as LEAF json: {type(exc).__name__}: {exc}") from exc
    if len(users) != len(num) or any(u not in user_data for u in users):
        raise ConfigError(KEY, f"{path}: 'users', 'num_samples' and 'user_data' disagree")
    return data


class LeafReader:
    """Reads the x of rows (users' samples in train files then test files), one parsed file cached."""

    CACHED_FILES = 2  # a client reads one train and one test file

    def __init__(self, name: str, rows: _Rows):
        self.name, self.rows = name, rows
        self._cached: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self.parsed = 0  # files parsed to build clients (for tests)

    def release(self) -> None:
        self._cached.clear()

    def _user_x(self, block: int) -> np.ndarray:
        file = self.rows.block_file[block]
        if file not in self._cached:
            while len(self._cached) >= self.CACHED_FILES:  # drop the oldest file before parsing another
                self._cached.popitem(last=False)
            path = self.rows.files[file]
            parsed = _parse(path)["user_data"]
            self._cached[file] = {u: self._x(v["x"], path) for u, v in parsed.items()}
            self.parsed += 1
        self._cached.move_to_end(file)
        return self._cached[file][self.rows.block_user[block]]

    def _x(self, x: list, path: Path) -> np.ndarray:
        if self.name == "shakespeare":
            out = np.zeros((len(x), SEQ_LEN), dtype=np.int64)
            for i, s in enumerate(x):
                if len(s) != SEQ_LEN:
                    raise ConfigError(KEY, f"{path}: an x of {len(s)} characters, LEAF's are {SEQ_LEN}")
                out[i] = encode(s, str(path))
            return out
        arr = np.asarray(x, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != 784:
            raise ConfigError(KEY, f"{path}: FEMNIST x must be 784 values per sample, got shape {arr.shape}")
        return arr.reshape(-1, 1, 28, 28)

    def read(self, rows: np.ndarray) -> np.ndarray:
        starts = np.asarray(self.rows.starts)
        blocks = np.searchsorted(starts, rows, side="right") - 1
        shape = (SEQ_LEN,) if self.name == "shakespeare" else (1, 28, 28)
        out = np.empty((len(rows), *shape), dtype=np.int64 if self.name == "shakespeare" else np.float32)
        for b in np.unique(blocks):  # blocks are in file order: each file is parsed once per call
            mask = blocks == b
            out[mask] = self._user_x(int(b))[rows[mask] - starts[b]]
        return out


def _labels(name: str, y: list, path: Path) -> np.ndarray:
    try:
        if name == "shakespeare":
            return np.array([encode(c, str(path))[0] if len(c) == 1 else -1 for c in y], dtype=np.int64)
        labels = np.asarray(y, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(KEY, f"{path}: its y are not LEAF {name} labels ({exc}); is data.name right?") from exc
    if len(labels) and (labels.min() < 0 or labels.max() >= FEMNIST_CLASSES):
        raise ConfigError(KEY, f"{path}: FEMNIST labels must be 0..{FEMNIST_CLASSES - 1}")
    return labels


def _check_x(name: str, x: list, num: int, path: Path, user: str) -> None:
    """One line at start-up for x that clients could not be built from: a count other than y's, or a sample
    of another length or kind than the data set's (784 numbers; a string of 80 characters)."""
    text = name == "shakespeare"
    want, unit = (SEQ_LEN, "characters") if text else (784, "values")
    if not isinstance(x, list) or len(x) != num:
        raise ConfigError(KEY, f"{path}: user {user!r} has {len(x) if isinstance(x, list) else 'no list of'} x "
                          f"for {num} y")  # fmt: skip
    for sample in x:
        if not isinstance(sample, str if text else list) or len(sample) != want:
            size = f"{len(sample)} {unit}" if isinstance(sample, (str, list)) else type(sample).__name__
            raise ConfigError(KEY, f"{path}: user {user!r} has an x of {size}; LEAF's {name} has {want} {unit} "
                              "(is data.name right?)")  # fmt: skip


def read(cfg: DataConfig) -> Tagged:
    """Labels, split and user of every sample under ``data.root``; samples stay on disk until a client is built."""
    root = Path(cfg.root or "").expanduser()
    if not root.is_dir():
        raise ConfigError(KEY, f"no directory {root}: expected {HOW} (train/*.json, test/*.json)")
    rows, labels, splits, users = _Rows(), [], [], []
    codes: dict[str, int] = {}
    for split, code in (("train", TRAIN), ("test", TEST)):
        for path in _json_files(root, split):
            data = _parse(path)
            rows.files.append(path)
            for user in data["users"]:
                if code == TRAIN:
                    codes.setdefault(user, len(codes))
                elif user not in codes:
                    raise ConfigError(KEY, f"{path}: user {user!r} has test samples but no training samples")
                samples = data["user_data"][user]
                if not isinstance(samples, dict) or not isinstance(samples.get("y"), list) or "x" not in samples:
                    raise ConfigError(KEY, f"{path}: user {user!r} has no list 'y' beside its 'x'")
                y = _labels(cfg.name, samples["y"], path)
                _check_x(cfg.name, samples["x"], len(y), path, user)
                if (y < 0).any():
                    raise ConfigError(KEY, f"{path}: user {user!r} has a y that is not one LEAF character")
                rows.block_file.append(len(rows.files) - 1)
                rows.block_user.append(user)
                rows.starts.append(rows.starts[-1] + len(y))
                labels.append(y)
                splits.append(np.full(len(y), code, dtype=np.int8))
                users.append(np.full(len(y), codes[user], dtype=np.int64))
    names = list(codes)
    reader = LeafReader(cfg.name, rows)
    if cfg.name == "shakespeare":
        classes, shape, dtype = len(VOCAB), (SEQ_LEN,), np.int64
    else:
        classes, shape, dtype = FEMNIST_CLASSES, (1, 28, 28), np.float32
    y, split, user = np.concatenate(labels), np.concatenate(splits), np.concatenate(users)
    return Tagged(y, split, user, names, classes, shape, reader.read, dtype, reader.release)
