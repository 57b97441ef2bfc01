"""Tiny data sets written in their exact on-disk formats (CIFAR python pickles, LEAF json, HF save_to_disk), for
the data tests and the MPI runs; and checks that the files are what the real distributions look like."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

VOCAB = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"  # LEAF's, retyped


def _images(labels: np.ndarray, first_id: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n, 3072] in CIFAR's layout (R, G, B planes); class-dependent colour, and each image's first 3
    pixels of the red plane spell its id (base 256), so every image is unique and traceable."""
    n = len(labels)
    base = (labels[:, None] * 23 % 200).astype(np.int64) + rng.integers(0, 56, (n, 3072))
    ids = first_id + np.arange(n)
    base[:, 0], base[:, 1], base[:, 2] = ids // 65536, (ids // 256) % 256, ids % 256
    return base.astype(np.uint8)


def image_id(x_uint8: np.ndarray) -> np.ndarray:
    """The ids written by ``_images`` back from images [n, 3, 32, 32] (uint8 values)."""
    flat = x_uint8.reshape(len(x_uint8), -1).astype(np.int64)
    return flat[:, 0] * 65536 + flat[:, 1] * 256 + flat[:, 2]


def _dump(path: Path, entries: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(entries, f, protocol=2)


def write_cifar10(root: Path, train_per_class: int = 60, test_per_class: int = 10, seed: int = 0) -> dict:
    """``root/cifar-10-batches-py`` with data_batch_1..5, test_batch and batches.meta; returns the arrays."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    y_train = rng.permutation(np.repeat(np.arange(10), train_per_class))
    y_test = rng.permutation(np.repeat(np.arange(10), test_per_class))
    x_train, x_test = _images(y_train, 0, rng), _images(y_test, len(y_train), rng)
    for i, part in enumerate(np.array_split(np.arange(len(y_train)), 5), start=1):
        _dump(
            folder / f"data_batch_{i}",
            {
                b"batch_label": f"training batch {i} of 5".encode(),
                b"labels": y_train[part].tolist(),
                b"data": x_train[part],
                b"filenames": [f"img_{j}.png".encode() for j in part],
            },
        )
    _dump(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": y_test.tolist(), b"data": x_test})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 10000, b"num_vis": 3072})
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "folder": folder}


def write_cifar100(root: Path, train_per_class: int = 10, test_per_class: int = 5, seed: int = 0) -> dict:
    """``root/cifar-100-python`` with train, test (fine and coarse labels) and meta; coarse = fine // 5 here."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    out = {"folder": folder}
    first = 0
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = rng.permutation(np.repeat(np.arange(100), per_class))
        x = _images(fine, first, rng)
        first += len(fine)
        _dump(
            folder / split,
            {
                b"filenames": [b"f.png"] * len(fine),
                b"batch_label": split.encode(),
                b"fine_labels": fine.tolist(),
                b"coarse_labels": (fine // 5).tolist(),
                b"data": x,
            },
        )
        out[f"x_{split}"], out[f"fine_{split}"] = x, fine
    _dump(folder / "meta", {b"fine_label_names": [b"c"] * 100, b"coarse_label_names": [b"s"] * 20})
    return out


def _leaf_files(root: Path, users: list[str], data: dict[str, dict], split: str) -> None:
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    half = (len(users) + 1) // 2
    for i, group in enumerate((users[:half], users[half:])):
        content = {
            "users": group,
            "num_samples": [len(data[u]["y"]) for u in group],
            "user_data": {u: data[u] for u in group},
            "hierarchies": [],
        }
        (folder / f"all_data_{i}_niid_0_keep_0_{split}_9.json").write_text(json.dumps(content), encoding="utf-8")


def write_femnist(root: Path, num_users: int = 8, seed: int = 0) -> dict:
    """LEAF's FEMNIST layout under ``root`` (train/ and test/, two json files each); writer ids 'f0001_23' style."""
    rng = np.random.default_rng(seed)
    users = [f"f{1000 + 7 * i:04d}_{i % 90:02d}" for i in range(num_users)]
    train, test = {}, {}
    for i, u in enumerate(users):
        n_train, n_test = 6 + i % 3, 2 + i % 2
        for store, n in ((train, n_train), (test, n_test)):
            y = rng.integers(0, 62, n)
            x = np.round(rng.random((n, 784)), 3)
            store[u] = {"x": x.tolist(), "y": y.tolist()}
    _leaf_files(root, users, train, "train")
    _leaf_files(root, users, test, "test")
    return {"users": users, "train": train, "test": test}


def write_shakespeare(root: Path, num_users: int = 6, seed: int = 0) -> dict:
    """LEAF's Shakespeare layout: per role, 80-character windows of its lines and the next character."""
    rng = np.random.default_rng(seed)
    users = [f"THE_TRAGEDY_OF_KING_LEAR_{name}" for name in ("LEAR", "GONERIL", "REGAN", "CORDELIA", "KENT", "FOOL")]
    users = (users * (num_users // len(users) + 1))[:num_users]
    users = [f"{u}_{i}" if i >= 6 else u for i, u in enumerate(users)]
    train, test = {}, {}
    for i, u in enumerate(users):
        text = "".join(rng.choice(list(VOCAB), 200 + 10 * i))
        windows = [(text[j : j + 80], text[j + 80]) for j in range(0, len(text) - 80, 7)]
        cut = max(1, len(windows) // 5)
        test[u] = {"x": [w for w, _ in windows[:cut]], "y": [c for _, c in windows[:cut]]}
        train[u] = {"x": [w for w, _ in windows[cut:]], "y": [c for _, c in windows[cut:]]}
    _leaf_files(root, users, train, "train")
    _leaf_files(root, users, test, "test")
    return {"users": users, "train": train, "test": test}


def write_hf(
    root: Path, clients: list[str] | None = None, per_client: int = 8, seed: int = 0, narrow: str | None = None
) -> dict:
    """A DatasetDict (train, test) with an Image column, a ClassLabel and a string client column, written by
    ``save_to_disk`` to ``root/hf``, and the same splits as parquet files under ``root/parquet``. The images are
    6 x 5 pixels, those of client ``narrow`` 6 x 4."""
    import datasets
    from PIL import Image

    clients = clients or ["bob", "alice", "carol", "dave"]
    rng = np.random.default_rng(seed)
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"]), "who": datasets.Value("string")}
    )
    splits, arrays = {}, {}
    for split, n in (("train", per_client), ("test", max(2, per_client // 4))):
        who = [c for c in clients for _ in range(n)]
        labels = rng.integers(0, 3, len(who))
        pixels = rng.integers(0, 256, (len(who), 6, 5, 3), dtype=np.uint8)
        images = [Image.fromarray(p if w != narrow else p[:, :4]) for p, w in zip(pixels, who, strict=True)]
        splits[split] = datasets.Dataset.from_dict(
            {"img": images, "label": labels.tolist(), "who": who}, features=features
        )
        arrays[split] = {"pixels": pixels, "labels": labels, "who": np.array(who)}
    datasets.DatasetDict(splits).save_to_disk(str(root / "hf"))
    (root / "parquet").mkdir(parents=True, exist_ok=True)
    for split, ds in splits.items():
        ds.to_parquet(str(root / "parquet" / f"{split}-00000-of-00001.parquet"))
    return arrays


def write_split_file(path: Path, users: int = 5, per_user: int = 20, seed: int = 0) -> None:
    """An .h5 of your own: x [n, 1, 8, 8], y, string client ids and a train/val/test split per sample."""
    import h5py

    rng = np.random.default_rng(seed)
    n = users * per_user
    split = np.array(["train", "train", "train", "val", "test"])[np.arange(n) % 5]
    with h5py.File(path, "w") as f:
        f["x"] = rng.random((n, 1, 8, 8)).astype(np.float32)
        f["y"] = rng.integers(0, 4, n)
        f["client"] = np.char.encode(np.array([f"site-{u:02d}" for u in (np.arange(n) // 5) % users]), "utf-8")
        f["split"] = np.char.encode(split, "utf-8")


# -- the fixtures are in the distributed formats ----------------------------------------------------------


def test_cifar_fixture_reads_like_the_real_batches(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path)
    with (written["folder"] / "data_batch_1").open("rb") as f:
        batch = pickle.load(f, encoding="bytes")  # how the CIFAR page says to read them
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape[1] == 3072
    assert set(batch) >= {b"data", b"labels"} and len(batch[b"labels"]) == batch[b"data"].shape[0]
    ids = image_id(written["x_train"].reshape(-1, 3, 32, 32))
    assert len(set(ids.tolist())) == len(ids)


def test_leaf_fixture_has_leafs_keys(tmp_path: Path) -> None:
    write_shakespeare(tmp_path)
    data = json.loads(next((tmp_path / "train").glob("*.json")).read_text())
    assert set(data) >= {"users", "num_samples", "user_data"}
    user = data["users"][0]
    assert len(data["user_data"][user]["x"][0]) == 80 and len(data["user_data"][user]["y"][0]) == 1
    assert data["num_samples"][0] == len(data["user_data"][user]["y"])


def test_vocabulary_retyped_here_matches_leafs_length_and_order() -> None:
    from pfl_mpi.data.leaf import VOCAB as LIB_VOCAB

    assert len(VOCAB) == 80 and VOCAB == LIB_VOCAB and len(set(VOCAB)) == 80
