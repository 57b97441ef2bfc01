"""Data sets read from disk in their distributed formats: CIFAR-10/100 pickles, LEAF json, HF save_to_disk and
parquet, files with a split array; official test splits, validation, sub-sampled users, missing files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pfl_mpi.cli import main
from pfl_mpi.data import DataConfig, load_federated
from pfl_mpi.errors import ConfigError

from .test_datasets_fixtures import (
    VOCAB,
    image_id,
    write_cifar10,
    write_cifar100,
    write_femnist,
    write_hf,
    write_shakespeare,
)

MEAN10 = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)[:, None, None]
STD10 = np.array([0.2023, 0.1994, 0.2010], dtype=np.float32)[:, None, None]
REPO = Path(__file__).parents[1]


def _raw(x: torch.Tensor, mean: np.ndarray = MEAN10, std: np.ndarray = STD10) -> np.ndarray:
    """Normalised CIFAR images back to their uint8 pixels."""
    return np.rint((x.numpy() * std + mean) * 255).astype(np.int64)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cifar")
    written = write_cifar10(root)
    written["root"] = root
    return written


def _cifar_cfg(cifar: dict, **kw) -> DataConfig:
    base = dict(name="cifar10", root=str(cifar["root"]), num_clients=50, partition="shards", classes_per_client=2)
    return DataConfig(**{**base, **kw})


# -- CIFAR ----------------------------------------------------------------------------------------------


def test_cifar10_official_test_follows_each_clients_train_labels(cifar) -> None:
    """pFedHN's protocol: train from the 5 train batches, test from test_batch, each client's test classes in
    proportion to its train classes; the clients' sets are disjoint and every image is the file's."""
    fd = load_federated(_cifar_cfg(cifar), 0)
    train_ids = set(range(len(cifar["y_train"])))
    seen_train, seen_test = set(), set()
    for k in range(fd.num_clients):
        c = fd.client(k)
        ids_tr, ids_te = image_id(_raw(c.x_train)), image_id(_raw(c.x_test))
        assert set(ids_tr.tolist()) <= train_ids and not set(ids_te.tolist()) & train_ids
        np.testing.assert_array_equal(c.y_train.numpy(), cifar["y_train"][ids_tr])  # labels are the file's
        np.testing.assert_array_equal(c.y_test.numpy(), cifar["y_test"][ids_te - len(train_ids)])
        # pixels equal the batch's bytes (an independent decoding of the file)
        np.testing.assert_array_equal(_raw(c.x_train).reshape(len(ids_tr), -1), cifar["x_train"][ids_tr])
        train_hist = np.bincount(c.y_train.numpy(), minlength=10)
        test_hist = np.bincount(c.y_test.numpy(), minlength=10)
        assert (train_hist > 0).sum() == 2 and set(np.flatnonzero(test_hist)) == set(np.flatnonzero(train_hist))
        # 10 clients share each class's 10 test images in proportion to their (equal) train shards
        np.testing.assert_array_equal(test_hist, (train_hist > 0) * 1)
        assert not seen_train & set(ids_tr.tolist()) and not seen_test & set(ids_te.tolist())
        seen_train |= set(ids_tr.tolist())
        seen_test |= set(ids_te.tolist())
    assert len(seen_train) == 600 and len(seen_test) == 100
    np.testing.assert_array_equal(fd.train_sizes, 12)
    np.testing.assert_array_equal(fd.test_sizes, 2)


def test_cifar10_test_from_client_splits_the_train_batches_only(cifar) -> None:
    fd = load_federated(_cifar_cfg(cifar, test_from="client", test_fraction=0.25), 0)
    for k in (0, 17, 49):
        c = fd.client(k)
        ids = image_id(_raw(torch.cat([c.x_train, c.x_test])))
        assert ids.max() < 600 and len(c.y_test) == 3 and len(c.y_train) == 9


def test_cifar100_fine_and_coarse_labels(tmp_path: Path) -> None:
    written = write_cifar100(tmp_path)
    mean = np.array([0.5071, 0.4865, 0.4409], dtype=np.float32)[:, None, None]
    std = np.array([0.2673, 0.2564, 0.2762], dtype=np.float32)[:, None, None]
    for labels, classes in (("fine", 100), ("coarse", 20)):
        cfg = DataConfig(
            name="cifar100",
            root=str(tmp_path / "cifar-100-python"),
            num_clients=50,
            partition="shards",
            classes_per_client=10,
            min_samples=2,
            cifar100_labels=labels,
        )
        fd = load_federated(cfg, 1)
        assert fd.num_classes == classes
        c = fd.client(4)
        ids = image_id(_raw(c.x_train, mean, std))
        fine = written["fine_train"][ids]
        np.testing.assert_array_equal(c.y_train.numpy(), fine if labels == "fine" else fine // 5)


def test_a_rank_reads_only_the_batches_of_its_clients(cifar, monkeypatch) -> None:
    """Building a client unpickles the batches that hold its images, keeps none of them: two builds read again."""
    from pfl_mpi.data import cifar as cifar_module

    fd = load_federated(_cifar_cfg(cifar), 0)
    reads: list[str] = []
    real = cifar_module._load
    monkeypatch.setattr(cifar_module, "_load", lambda path: (reads.append(path.name), real(path))[1])
    c = fd.client(0)
    assert "test_batch" in reads and len(reads) <= 6
    ids = image_id(_raw(c.x_train))
    batches = {f"data_batch_{1 + i // 120}" for i in ids}  # the fixture puts 120 images in each train batch
    assert set(reads) == batches | {"test_batch"}


@pytest.mark.parametrize(("name", "expected"), [("cifar10", "data_batch_1"), ("cifar100", "train")])
def test_missing_cifar_names_data_root_and_the_file(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name=name, root=str(tmp_path / "nowhere"), partition="iid"), 0)
    assert info.value.key == "data.root" and expected in info.value.message


MISSING = {  # config, the key named, what the line says was expected
    "cifar10": ("papers/cifar10-pfedhn", "data.root", "data_batch_1"),
    "cifar100": ("papers/cifar100-pfedhn", "data.root", "cifar-100-python/train"),
    "femnist": ("papers/femnist-fedavg", "data.root", "train/*.json"),
    "shakespeare": ("papers/shakespeare-fedavg", "data.root", "train/*.json"),
    "hf": ("default", "data.root", "save_to_disk"),
    "file": ("default", "data.path", "no such file"),
}


@pytest.mark.parametrize("name", sorted(MISSING))
def test_missing_data_set_exits_2_with_one_line_before_mpi(tmp_path: Path, capsys, name: str) -> None:
    config, key, expected = MISSING[name]
    where = tmp_path / "nowhere"
    sets = [f"data.root={where}"] if name != "file" else [f"data.path={where}.npz"]
    sets += [f"data.name={name}", "data.partition=iid"] if config == "default" and name == "hf" else []
    sets += ["data.name=file", "data.partition=iid"] if name == "file" else []
    argv = ["run", str(REPO / "configs" / f"{config}.yaml"), *(t for s in sets for t in ("--set", s))]
    code = main([*argv, "-n", "2", "--out", str(tmp_path / "r.h5")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert key in err[0] and expected in err[0] and str(where) in err[0]
    assert not (tmp_path / "r.h5").exists()


def test_root_required_and_only_for_disk_data_sets() -> None:
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="cifar10"), 0)
    assert info.value.key == "data.root"
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="digits", root="/x"), 0)
    assert info.value.key == "data.root"


# -- LEAF -----------------------------------------------------------------------------------------------


def test_femnist_natural_partition_keeps_leafs_users_and_split(tmp_path: Path) -> None:
    written = write_femnist(tmp_path)
    users = written["users"]
    fd = load_federated(DataConfig(name="femnist", root=str(tmp_path), num_clients=len(users), min_samples=2), 0)
    assert fd.client_names == users and fd.partition == "natural" and fd.num_classes == 62
    assert fd.input_shape == (1, 28, 28)
    for k, user in enumerate(users):
        c = fd.client(k)
        for part, (x, y) in (("train", (c.x_train, c.y_train)), ("test", (c.x_test, c.y_test))):
            expected = written[part][user]
            np.testing.assert_allclose(x.reshape(len(x), -1).numpy(), np.array(expected["x"], dtype=np.float32))
            np.testing.assert_array_equal(y.numpy(), expected["y"])
    assert fd.partition_columns()["client_names"].tolist() == [u.encode() for u in users]


def test_shakespeare_tokens_follow_leafs_vocabulary(tmp_path: Path) -> None:
    written = write_shakespeare(tmp_path)
    users = written["users"]
    fd = load_federated(DataConfig(name="shakespeare", root=str(tmp_path), num_clients=len(users), min_samples=2), 0)
    assert fd.num_classes == 80 and fd.input_shape == (80,) and fd.client_names == users
    c = fd.client(2)
    expected = written["train"][users[2]]
    assert c.x_train.dtype == torch.int64
    assert c.x_train.tolist() == [[VOCAB.index(ch) for ch in s] for s in expected["x"]]
    assert c.y_train.tolist() == [VOCAB.index(ch) for ch in expected["y"]]
    assert c.y_test.tolist() == [VOCAB.index(ch) for ch in written["test"][users[2]]["y"]]


def test_shakespeare_character_outside_the_vocabulary_is_a_config_error(tmp_path: Path) -> None:
    write_shakespeare(tmp_path)
    path = next((tmp_path / "train").glob("*.json"))
    data = json.loads(path.read_text())
    data["user_data"][data["users"][0]]["y"][0] = "\u00e9"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="shakespeare", root=str(tmp_path), num_clients=6, min_samples=2), 0)
    assert info.value.key == "data.root" and "vocabulary" in info.value.message


def _spoil_first_user(root: Path, spoil) -> None:
    path = sorted((root / "train").glob("*.json"))[0]
    data = json.loads(path.read_text())
    spoil(data["user_data"][data["users"][0]])
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("written", "name", "spoil", "expected"),
    [
        ("femnist", "femnist", lambda u: u["x"][0].pop(), "has an x of 783 values; LEAF's femnist has 784 values"),
        ("femnist", "femnist", lambda u: u["x"].pop(), "x for "),
        ("femnist", "shakespeare", lambda u: None, "is data.name right?"),
        ("shakespeare", "femnist", lambda u: None, "is data.name right?"),
        ("shakespeare", "shakespeare", lambda u: u["x"].__setitem__(0, u["x"][0][:79]), "an x of 79 characters"),
    ],
    ids=["short_image", "fewer_x_than_y", "femnist_files_as_shakespeare", "shakespeare_files_as_femnist", "short_text"],
)
def test_leaf_samples_clients_cannot_be_built_from_are_refused_at_start_up(tmp_path, written, name, spoil, expected):
    """Checked when the files are first read (before any rank builds a client): one line naming the file."""
    users = (write_femnist if written == "femnist" else write_shakespeare)(tmp_path)["users"]
    _spoil_first_user(tmp_path, spoil)
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name=name, root=str(tmp_path), num_clients=len(users), min_samples=2), 0)
    assert info.value.key == "data.root" and expected in info.value.message and ".json" in info.value.message


def test_max_clients_draws_users_by_seed_in_their_order(tmp_path: Path) -> None:
    users = write_femnist(tmp_path)["users"]

    def names(seed: int) -> list[str]:
        cfg = DataConfig(name="femnist", root=str(tmp_path), num_clients=3, max_clients=3, min_samples=2, seed=seed)
        return load_federated(cfg, 0).client_names

    picked = {tuple(names(s)) for s in range(6)}
    assert len(picked) > 1 and names(2) == names(2)
    for chosen in picked:
        assert list(chosen) == sorted(chosen, key=users.index) and set(chosen) <= set(users)
    with pytest.raises(ConfigError) as info:  # num_clients must match what is kept
        load_federated(DataConfig(name="femnist", root=str(tmp_path), num_clients=4, max_clients=3, min_samples=2), 0)
    assert info.value.key == "data.num_clients" and "data.max_clients keeps 3 users" in info.value.message


def test_missing_leaf_folder_names_data_root(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="femnist", root=str(tmp_path), num_clients=2), 0)
    assert info.value.key == "data.root" and "train" in info.value.message and ".json" in info.value.message


# -- Hugging Face ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("hf")
    return root, write_hf(root)


@pytest.mark.parametrize("layout", ["hf", "parquet"])
def test_hf_from_disk_natural_clients_and_official_test(hf_dirs, layout: str) -> None:
    root, arrays = hf_dirs
    cfg = DataConfig(name="hf", root=str(root / layout), num_clients=4, min_samples=2, hf={"x": "img", "client": "who"})
    fd = load_federated(cfg, 0)
    assert fd.client_names == ["alice", "bob", "carol", "dave"] and fd.num_classes == 3
    assert fd.input_shape == (3, 6, 5)
    for k, name in enumerate(fd.client_names):
        c = fd.client(k)
        for split, (x, y) in (("train", (c.x_train, c.y_train)), ("test", (c.x_test, c.y_test))):
            rows = np.flatnonzero(arrays[split]["who"] == name)
            expected = arrays[split]["pixels"][rows].transpose(0, 3, 1, 2).astype(np.float32) / 255
            np.testing.assert_allclose(x.numpy(), expected, rtol=0, atol=1e-7)
            np.testing.assert_array_equal(y.numpy(), arrays[split]["labels"][rows])


def _hf_feature_files(root: Path) -> dict[str, np.ndarray]:
    """Numeric features (a list column), labels, no client column; train, validation and test written as parquet
    files (``root/parquet``) and as the .arrow files save_to_disk leaves (``root/arrow``), named by split."""
    import datasets

    rng = np.random.default_rng(3)
    arrays = {}
    for part in ("parquet", "arrow"):
        (root / part).mkdir(parents=True)
    for split, n in (("train", 40), ("validation", 12), ("test", 12)):
        feat = np.round(rng.normal(size=(n, 3)), 3).astype(np.float32)
        feat[:, 0] = np.arange(n) + {"train": 0, "validation": 100, "test": 200}[split]  # traceable rows
        ds = datasets.Dataset.from_dict({"feat": feat.tolist(), "label": rng.integers(0, 2, n).tolist()})
        ds.to_parquet(str(root / "parquet" / f"{split}-00000-of-00001.parquet"))
        ds.save_to_disk(str(root / "disk" / split))
        shutil.copy(next((root / "disk" / split).glob("*.arrow")), root / "arrow" / f"{split}-00000.arrow")
        arrays[split] = feat
    return arrays


def test_hf_arrow_and_parquet_files_of_features_without_client_ids(tmp_path: Path) -> None:
    """A feature column, no client column (the partitioner deals out train), a validation split evaluated
    (eval_on): each client's rows come from the right split, and .arrow and .parquet files give the same clients."""
    arrays = _hf_feature_files(tmp_path)
    seen = {}
    for layout in ("arrow", "parquet"):
        cfg = DataConfig(
            name="hf",
            root=str(tmp_path / layout),
            num_clients=4,
            min_samples=2,
            hf={"x": "feat"},
            eval_on=["val", "test"],
        )
        fd = load_federated(cfg, 0)
        assert fd.input_shape == (3,) and fd.num_classes == 2 and fd.client_names is None
        clients = [fd.client(k) for k in range(4)]
        train = np.concatenate([c.x_train.numpy() for c in clients])
        np.testing.assert_array_equal(np.sort(train[:, 0]), arrays["train"][:, 0])  # the train split, dealt whole
        for split, part in (("validation", "x_val"), ("test", "x_test")):
            rows = np.concatenate([getattr(c, part).numpy() for c in clients])
            assert set(rows[:, 0]) <= set(arrays[split][:, 0]) and len(rows) == len(set(rows[:, 0]))
        assert (fd.val_sizes > 0).all() and (fd.test_sizes > 0).all()
        seen[layout] = [tuple(t.numpy().tobytes() for t in (c.x_train, c.x_val, c.x_test)) for c in clients]
    assert seen["arrow"] == seen["parquet"]


def test_hf_parquet_is_read_by_column_and_row_group(tmp_path: Path, monkeypatch) -> None:
    """Memory: start-up reads the label and client columns of parquet files, never x whole; building a client reads
    x from the row groups that hold its rows only."""
    import datasets
    import pyarrow.parquet as pq

    who = np.repeat(np.array(["ann", "bo", "cy", "di"]), 8)
    feat = np.arange(len(who) * 2, dtype=np.float32).reshape(-1, 2)
    for split in ("train", "test"):
        data = {"feat": feat.tolist(), "label": (np.arange(len(who)) % 2).tolist(), "who": who.tolist()}
        datasets.Dataset.from_dict(data).to_parquet(str(tmp_path / f"{split}-0.parquet"), batch_size=8)
    assert pq.ParquetFile(tmp_path / "train-0.parquet").num_row_groups == 4  # one client per row group
    whole, groups = [], []
    read, read_row_group = pq.ParquetFile.read, pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile, "read", lambda f, columns=None, **k: (whole.append(columns), read(f, columns, **k))[1]
    )
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_group",
        lambda f, i, columns=None, **k: (groups.append(i), read_row_group(f, i, columns, **k))[1],
    )
    cfg = DataConfig(name="hf", root=str(tmp_path), num_clients=4, min_samples=2, hf={"x": "feat", "client": "who"})
    fd = load_federated(cfg, 0)
    assert ["feat"] not in whole and ["label"] in whole and ["who"] in whole
    assert len(groups) == 1  # the shape of x, from one row group
    groups.clear()
    c = fd.client(fd.client_names.index("cy"))
    assert groups == [2, 2]  # train and test: the third row group of each file
    np.testing.assert_array_equal(c.x_train.numpy(), feat[who == "cy"])


def test_hf_offline_and_a_missing_column_names_its_key(hf_dirs) -> None:
    import os

    root, _ = hf_dirs
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="hf", root=str(root / "hf"), num_clients=4, hf={"x": "pixels"}), 0)
    assert info.value.key == "data.hf.x" and "img" in info.value.message
    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"


def test_hf_x_that_is_not_numbers_of_one_shape_names_its_key(tmp_path: Path) -> None:
    """A string column as x: one line at start-up; images of two sizes: one line when the client is built."""
    write_hf(tmp_path, narrow="dave")
    cfg = {"name": "hf", "root": str(tmp_path / "hf"), "num_clients": 4, "min_samples": 2}
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(**cfg, hf={"x": "who", "client": "who"}), 0)
    assert info.value.key == "data.hf.x" and "'who' is not numbers of one shape" in info.value.message
    fd = load_federated(DataConfig(**cfg, hf={"x": "img", "client": "who"}), 0)
    assert fd.input_shape == (3, 6, 5) and fd.client(0).x_train.shape[1:] == (3, 6, 5)  # alice
    with pytest.raises(ConfigError) as info:
        fd.client(fd.client_names.index("dave"))
    assert info.value.key == "data.hf.x" and "(3, 6, 4) beside rows of (3, 6, 5)" in info.value.message


def test_bad_samples_found_by_one_worker_end_every_rank_with_one_line(tmp_path: Path) -> None:
    """Only the worker hosting the client with smaller images reads them: the ranks agree, rank 0 prints the
    worker's line, every rank exits 2 (no MPI abort), and neither file nor lock is left."""
    write_hf(tmp_path, narrow="dave")
    sets = ["data.name=hf", f"data.root={tmp_path / 'hf'}", "data.hf.x=img", "data.hf.client=who", "model.name=mlp"]
    sets += ["data.num_clients=4", "data.min_samples=2", "clients_per_round=2", "rounds=2", "train.batch_size=4"]
    out = tmp_path / "r.h5"
    argv = ["run", *(t for s in sets for t in ("--set", s)), "-n", "3", "--out", str(out), "--quiet"]
    run = subprocess.run([sys.executable, "-m", "pfl_mpi", *argv], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pfl-mpi: config error: data.hf.x: column 'img' has rows"), lines
    assert re.search(r"\(rank [12] of 3, host ", lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "parquet"]


def test_hf_without_the_datasets_package_says_how_to_install(hf_dirs, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="hf", root=str(hf_dirs[0] / "hf"), num_clients=4), 0)
    assert "pip install" in info.value.message and "pfl_mpi[hf]" in info.value.message


# -- your own splits ------------------------------------------------------------------------------------


def _split_file(path: Path, ids: np.ndarray) -> dict:
    rng = np.random.default_rng(5)
    n = len(ids)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    x[:, 0] = np.arange(n)  # row number, to trace rows back
    split = np.array(["train", "val", "test", "train", "train"] * (n // 5))
    arrays = {"x": x, "y": rng.integers(0, 3, n), "client": ids, "split": split}
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        with h5py.File(path, "w") as f:
            for name, a in arrays.items():
                f.create_dataset(name, data=np.char.encode(a, "utf-8") if a.dtype.kind == "U" else a)
    return arrays


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
@pytest.mark.parametrize("kind", ["string", "int"])
def test_file_split_is_kept_with_string_or_integer_client_ids(tmp_path: Path, suffix: str, kind: str) -> None:
    """The bug: a given split was silently replaced and string ids refused. Now each client's train, val and test
    rows are exactly the file's."""
    names = np.array(["u/zed", "anna", "mo"]) if kind == "string" else np.array([30, 4, 17])
    ids = names[np.arange(60) % 3]
    arrays = _split_file(tmp_path / f"d{suffix}", ids)
    fd = load_federated(DataConfig(name="file", path=str(tmp_path / f"d{suffix}"), num_clients=3, min_samples=2), 0)
    order = sorted(names.tolist())
    assert fd.client_names == [str(n) for n in order]
    for k, name in enumerate(order):
        c = fd.client(k)
        mine = ids == name
        for split, x in (("train", c.x_train), ("val", c.x_val), ("test", c.x_test)):
            expected = np.flatnonzero(mine & (arrays["split"] == split))
            assert sorted(x[:, 0].long().tolist()) == expected.tolist()
    assert (fd.val_sizes == 4).all() and (fd.test_sizes == 4).all() and (fd.train_sizes == 12).all()


def test_eval_on_names_the_splits_and_needs_a_validation_split(tmp_path: Path) -> None:
    ids = np.array(["a", "b"])[np.arange(40) % 2]
    arrays = _split_file(tmp_path / "d.npz", ids)
    base = dict(name="file", path=str(tmp_path / "d.npz"), num_clients=2, min_samples=2)
    cfg = DataConfig(**base, eval_on=["val", "test", "val"])
    assert cfg.eval_splits == ("test", "val") and DataConfig(**base).eval_splits == ("test",)
    c = load_federated(cfg, 0).client(1)  # both splits kept apart, each as the file tags it
    for split, x in (("val", c.x_val), ("test", c.x_test)):
        assert sorted(x[:, 0].long().tolist()) == np.flatnonzero((ids == "b") & (arrays["split"] == split)).tolist()
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="digits", num_clients=5, eval_on=["val", "test"]), 0)
    assert info.value.key == "data.eval_on" and "data.val_fraction" in info.value.message
    with pytest.raises(ValidationError):
        DataConfig(**base, eval_on=[])


def test_eval_split_is_a_deprecated_alias_of_eval_on(tmp_path: Path) -> None:
    with pytest.warns(FutureWarning, match=r"data.eval_split is deprecated: write data.eval_on: \[val\]"):
        cfg = DataConfig(name="digits", num_clients=5, val_fraction=0.2, eval_split="val")
    assert cfg.eval_splits == ("val",)
    with pytest.warns(FutureWarning), pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="digits", num_clients=5, eval_split="val"), 0)
    assert info.value.key == "data.eval_split"
    with pytest.warns(FutureWarning), pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="digits", num_clients=5, eval_split="test", eval_on=["val"]), 0)
    assert info.value.key == "data.eval_split" and "eval_on" in info.value.message


def test_unknown_split_tags_are_refused(tmp_path: Path) -> None:
    arrays = _split_file(tmp_path / "d.npz", np.array(["a", "b"])[np.arange(20) % 2])
    arrays["split"][3] = "other"
    np.savez(tmp_path / "e.npz", **arrays)
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="file", path=str(tmp_path / "e.npz"), num_clients=2), 0)
    assert info.value.key == "data.path" and "'other'" in info.value.message


def test_val_fraction_takes_validation_out_of_training_samples() -> None:
    plain = load_federated(DataConfig(name="digits", num_clients=20, partition="shards"), 0)
    fd = load_federated(DataConfig(name="digits", num_clients=20, partition="shards", val_fraction=0.25), 0)
    np.testing.assert_array_equal(fd.test_sizes, plain.test_sizes)
    np.testing.assert_array_equal(fd.train_sizes + fd.val_sizes, plain.train_sizes)
    for k in (0, 7):
        a, b = plain.client(k), fd.client(k)
        assert torch.equal(a.x_test, b.x_test)  # the test set is untouched
        rows = lambda t: {tuple(r) for r in t.reshape(len(t), -1).tolist()}  # noqa: E731
        assert rows(b.x_train) | rows(b.x_val) == rows(a.x_train) and not rows(b.x_train) & rows(b.x_val)
        assert len(b.y_val) == fd.val_sizes[k] == round(plain.train_sizes[k] * 0.25)
    assert plain.client(0).x_val is None
    assert "val_sizes" in fd.partition_columns() and plain.partition_columns() == {}


def test_a_rank_keeps_no_parsed_leaf_file_once_its_clients_are_built(tmp_path: Path, monkeypatch) -> None:
    """Memory: after start-up a rank holds its clients' samples only, not the json files they came from."""
    from pfl_mpi.comm.serial import SerialWorld
    from pfl_mpi.config import load_config
    from pfl_mpi.data.leaf import LeafReader
    from pfl_mpi.runtime import Engine

    readers: list[LeafReader] = []
    init = LeafReader.__init__

    def recording(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        readers.append(self)

    monkeypatch.setattr(LeafReader, "__init__", recording)
    write_femnist(tmp_path / "femnist")
    sets = [f"data.root={tmp_path / 'femnist'}", "data.num_clients=8", "data.max_clients=8", "clients_per_round=2"]
    config = Path(__file__).parents[1] / "configs" / "papers" / "femnist-fedavg.yaml"
    engine = Engine(load_config(config, [*sets, f"output={tmp_path / 'run.h5'}"]), SerialWorld(), show_progress=False)
    assert len(engine.client_data) == 8 and readers[-1].parsed == 4  # 2 train and 2 test files, each parsed once
    assert not readers[-1]._cached


def test_leaf_clients_in_increasing_order_parse_each_file_once(tmp_path: Path, monkeypatch) -> None:
    """Building clients as the engine does (increasing ids) parses each json file once, then the cache is emptied."""
    from pfl_mpi.data import leaf

    users = write_femnist(tmp_path, num_users=10)["users"]
    fd = load_federated(DataConfig(name="femnist", root=str(tmp_path), num_clients=10, min_samples=2), 0)
    parsed: list[str] = []
    real = leaf._parse
    monkeypatch.setattr(leaf, "_parse", lambda path: (parsed.append(path.name), real(path))[1])
    built = fd.clients(range(10))
    assert sorted(built) == list(range(10)) and len(parsed) == 4 == len(set(parsed))  # 2 train + 2 test files
    assert [len(built[k].y_train) for k in range(10)] == fd.train_sizes.tolist()
    parsed.clear()
    fd.client(0)  # the cache was emptied by clients()
    assert len(parsed) == 2 and users[0] == fd.client_names[0]


def test_max_clients_needs_client_ids(cifar) -> None:
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="hf", root=str(cifar["root"]), max_clients=3, partition="iid"), 0)
    assert info.value.key == "data.max_clients"
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="cifar10", root=str(cifar["root"]), max_clients=3), 0)
    assert info.value.key == "data.max_clients"


def test_a_client_with_held_out_samples_only_is_named(tmp_path: Path) -> None:
    ids = np.array(["a", "b", "c"])[np.arange(30) % 3]
    arrays = _split_file(tmp_path / "d.npz", ids)
    arrays["split"][ids == "b"] = "test"  # user b has no training sample
    np.savez(tmp_path / "e.npz", **arrays)
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="file", path=str(tmp_path / "e.npz"), num_clients=3, min_samples=2), 0)
    assert info.value.key == "data.test_from" and "'b'" in info.value.message
