"""The user's own data: .npz and .h5 files with x, y and optionally client ids."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pfl_mpi.data import DataConfig, FederatedData, load_federated
from pfl_mpi.errors import ConfigError

N_SAMPLES = 240
IDS = np.array([7, 3, 100, 42])  # not contiguous, not sorted


def make_arrays(with_client: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """x [n, 2, 3] whose first entry is the sample's row number, so rows can be traced back to the file."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N_SAMPLES, 2, 3)).astype(np.float32)
    x[:, 0, 0] = np.arange(N_SAMPLES)
    arrays = {"x": x, "y": rng.integers(0, 5, N_SAMPLES)}
    if with_client:
        arrays["client"] = IDS[rng.integers(0, len(IDS), N_SAMPLES)]
    return arrays


def write(path: Path, arrays: dict[str, np.ndarray]) -> str:
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        with h5py.File(path, "w") as f:
            for name, a in arrays.items():
                f.create_dataset(name, data=a)
    return str(path)


def rows_of(fd: FederatedData, k: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    c = fd.client(k)
    x = torch.cat([c.x_train, c.x_test])
    y = torch.cat([c.y_train, c.y_test])
    return x[:, 0, 0].numpy().astype(np.int64), x, y


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".hdf5"])
def test_file_with_client_ids_round_trips_as_the_natural_partition(tmp_path: Path, suffix: str) -> None:
    arrays = make_arrays(with_client=True)
    path = write(tmp_path / f"data{suffix}", arrays)
    fd = load_federated(DataConfig(name="file", path=path, num_clients=len(IDS), min_samples=2), 0)
    assert fd.partition == "natural" and fd.num_classes == 5 and fd.input_shape == (2, 3)
    seen = []
    for k, cid in enumerate(np.sort(IDS)):  # client k is the k-th smallest id
        rows, x, y = rows_of(fd, k)
        np.testing.assert_array_equal(np.sort(rows), np.flatnonzero(arrays["client"] == cid))
        torch.testing.assert_close(x, torch.from_numpy(arrays["x"][rows]), rtol=0, atol=0)
        np.testing.assert_array_equal(y.numpy(), arrays["y"][rows])
        assert fd.train_sizes[k] + fd.test_sizes[k] == len(rows)
        hist = np.bincount(fd.client(k).y_train.numpy(), minlength=5)
        np.testing.assert_array_equal(fd.label_histograms()[k], hist)
        seen.append(rows)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(N_SAMPLES))


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
@pytest.mark.parametrize("partition", [None, "iid", "dirichlet", "shards", "quantity"])
def test_file_without_client_ids_is_pooled_and_partitioned(tmp_path: Path, suffix: str, partition) -> None:
    arrays = make_arrays(with_client=False)
    path = write(tmp_path / f"data{suffix}", arrays)
    cfg = DataConfig(name="file", path=path, num_clients=10, partition=partition, min_samples=5)
    fd = load_federated(cfg, 1)
    assert fd.partition == (partition or "iid")
    seen = []
    for k in range(10):
        rows, x, y = rows_of(fd, k)
        torch.testing.assert_close(x, torch.from_numpy(arrays["x"][rows]), rtol=0, atol=0)
        np.testing.assert_array_equal(y.numpy(), arrays["y"][rows])
        seen.append(rows)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(N_SAMPLES))
    assert fd.label_histograms().sum() == fd.train_sizes.sum()


def test_npz_and_h5_of_the_same_arrays_give_the_same_clients(tmp_path: Path) -> None:
    arrays = make_arrays(with_client=False)
    cfg = dict(name="file", num_clients=8, partition="dirichlet")
    a = load_federated(DataConfig(path=write(tmp_path / "d.npz", arrays), **cfg), 4)
    b = load_federated(DataConfig(path=write(tmp_path / "d.h5", arrays), **cfg), 4)
    for k in range(8):
        ca, cb = a.client(k), b.client(k)
        assert torch.equal(ca.x_train, cb.x_train) and torch.equal(ca.y_test, cb.y_test)


def test_partition_other_than_natural_ignores_the_client_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "d.npz", make_arrays(with_client=True))
    fd = load_federated(DataConfig(name="file", path=path, num_clients=12, partition="iid"), 0)
    assert fd.num_clients == 12 and fd.partition == "iid"


def test_integer_inputs_are_converted_to_float32(tmp_path: Path) -> None:
    x = np.arange(N_SAMPLES * 4, dtype=np.uint8).reshape(N_SAMPLES, 4)
    path = write(tmp_path / "d.h5", {"x": x, "y": np.arange(N_SAMPLES) % 3})
    c = load_federated(DataConfig(name="file", path=path, num_clients=2), 0).client(0)
    assert c.x_train.dtype == torch.float32 and c.x_train.max() <= 255


BAD_FILES = {
    "no x": lambda a: {"y": a["y"]},
    "no y": lambda a: {"x": a["x"]},
    "float labels": lambda a: {"x": a["x"], "y": a["y"].astype(np.float32)},
    "negative labels": lambda a: {"x": a["x"], "y": a["y"] - 1},
    "y too short": lambda a: {"x": a["x"], "y": a["y"][:-1]},
    "x without features": lambda a: {"x": a["x"][:, 0, 0], "y": a["y"]},
    "text x": lambda a: {"x": np.array([[b"a"]] * N_SAMPLES), "y": a["y"]},
    "client too short": lambda a: {"x": a["x"], "y": a["y"], "client": a["client"][:10]},
    "float client ids": lambda a: {"x": a["x"], "y": a["y"], "client": a["client"].astype(float)},
    "empty": lambda a: {"x": a["x"][:0], "y": a["y"][:0]},
}


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_raise_config_error_on_data_path(tmp_path: Path, suffix: str, case: str) -> None:
    arrays = BAD_FILES[case](make_arrays(with_client=True))
    path = write(tmp_path / f"bad{suffix}", arrays)
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="file", path=path, num_clients=4), 0)
    assert info.value.key == "data.path"


@pytest.mark.parametrize(
    ("name", "content"),
    [("d.csv", b"1,2,3\n"), ("d.npz", b"not a zip file"), ("d.h5", b"not an hdf5 file")],
)
def test_unreadable_or_foreign_files_raise_config_error(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="file", path=str(path)), 0)
    assert info.value.key == "data.path"


def test_natural_partition_checks_the_number_of_clients_and_their_sizes(tmp_path: Path) -> None:
    arrays = make_arrays(with_client=True)
    path = write(tmp_path / "d.npz", arrays)
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="file", path=path, num_clients=5), 0)
    assert info.value.key == "data.num_clients" and "the data set has 4 client ids" in info.value.message
    arrays["client"][:] = 3
    arrays["client"][0] = 9  # client id 9 holds one sample: it cannot have a train and a test sample
    path = write(tmp_path / "e.npz", arrays)
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="file", path=path, num_clients=2, min_samples=2), 0)
    assert info.value.key == "data.min_samples"


def test_natural_partition_needs_client_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "d.h5", make_arrays(with_client=False))
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="file", path=path, partition="natural"), 0)
    assert info.value.key == "data.partition"


def test_shards_with_more_classes_per_client_than_the_file_has(tmp_path: Path) -> None:
    path = write(tmp_path / "d.npz", make_arrays(with_client=False))  # 5 classes
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="file", path=path, partition="shards", classes_per_client=6), 0)
    assert info.value.key == "data.classes_per_client"
    assert "6 classes per client, but the data set has 5 classes" in str(info.value)


def test_non_finite_inputs_are_reported_when_the_client_is_built(tmp_path: Path) -> None:
    arrays = make_arrays(with_client=False)
    arrays["x"][17, 1, 2] = np.nan
    path = write(tmp_path / "d.h5", arrays)
    fd = load_federated(DataConfig(name="file", path=path, num_clients=1), 0)
    with pytest.raises(ConfigError) as info:
        fd.client(0)
    assert info.value.key == "data.path" and "row 17" in info.value.message
