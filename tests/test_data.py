"""Data package: determinism, placement invariance, partitioners, Synthetic(alpha, beta), bad input."""

from __future__ import annotations

import hashlib
import json
import random
import socket
import subprocess
import sys

import numpy as np
import pydantic
import pytest
import torch

from pfl_mpi.data import ClientData, DataConfig, FederatedData, SyntheticConfig, load_federated
from pfl_mpi.data.partition import dirichlet, iid, quantity, shards
from pfl_mpi.errors import ConfigError

DIGITS_SIZE = 1797


def small_synthetic(**kw) -> SyntheticConfig:
    """Synthetic with a cap, so that tests generate little."""
    return SyntheticConfig(max_samples=300, **kw)


def assert_same(a: ClientData, b: ClientData) -> None:
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def digest(c: ClientData) -> str:
    h = hashlib.sha256()
    for t in (c.x_train, c.y_train, c.x_test, c.y_test):
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def tv_to_pooled(hist: np.ndarray) -> float:
    """Mean total-variation distance between each client's label distribution and the pooled one."""
    p = hist / hist.sum(1, keepdims=True)
    g = hist.sum(0) / hist.sum()
    return float(0.5 * np.abs(p - g).sum(1).mean())


# ---------------------------------------------------------------- interface, shapes, normalisation


@pytest.mark.parametrize(
    ("cfg", "shape", "classes"),
    [
        (DataConfig(name="digits", num_clients=20), (1, 8, 8), 10),
        (DataConfig(name="mnist1d", num_clients=20), (1, 40), 10),
        (DataConfig(name="synthetic", num_clients=20, synthetic=small_synthetic()), (60,), 10),
    ],
)
def test_shapes_dtypes_and_sizes_match_tensors(cfg: DataConfig, shape: tuple, classes: int) -> None:
    fd = load_federated(cfg, seed=0)
    assert isinstance(fd, FederatedData)
    assert fd.input_shape == shape and fd.num_classes == classes and fd.num_clients == 20
    assert fd.train_sizes.dtype == np.int64 and fd.test_sizes.dtype == np.int64
    for k in range(fd.num_clients):
        c = fd.client(k)
        assert c.x_train.dtype == torch.float32 and c.x_test.dtype == torch.float32
        assert c.y_train.dtype == torch.int64 and c.y_test.dtype == torch.int64
        assert tuple(c.x_train.shape) == (fd.train_sizes[k], *shape)
        assert tuple(c.x_test.shape) == (fd.test_sizes[k], *shape)
        assert len(c.y_train) == fd.train_sizes[k] and len(c.y_test) == fd.test_sizes[k]
        assert fd.train_sizes[k] >= 1 and fd.test_sizes[k] >= 1
        labels = torch.cat([c.y_train, c.y_test])
        assert labels.min() >= 0 and labels.max() < classes


def test_inputs_are_normalised() -> None:
    digits = load_federated(DataConfig(name="digits", num_clients=1, partition="iid"), 0).client(0)
    x = torch.cat([digits.x_train, digits.x_test])
    assert x.min() == 0.0 and x.max() == 1.0  # pixel values 0..16, divided by 16
    m1d = load_federated(DataConfig(name="mnist1d", num_clients=1), 0).client(0)
    x = torch.cat([m1d.x_train, m1d.x_test])
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02  # standardised by the generator


def test_mnist1d_is_generated_locally_without_network_and_leaves_global_rngs_alone(monkeypatch) -> None:
    from pfl_mpi.data import pooled

    pooled._mnist1d.cache_clear()

    def no_network(*args, **kwargs):
        raise AssertionError("the data package tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    cfg = DataConfig(name="mnist1d", num_clients=10, mnist1d={"num_samples": 1000})
    fd = load_federated(cfg, seed=0)
    assert np.random.random() == np_before and random.random() == py_before
    labels = torch.cat([torch.cat([fd.client(k).y_train, fd.client(k).y_test]) for k in range(10)])
    assert np.bincount(labels.numpy()).tolist() == [100] * 10  # the generator makes num_samples / 10 per class
    pooled._mnist1d.cache_clear()


# ---------------------------------------------------------------- determinism and placement invariance


@pytest.mark.parametrize(
    "cfg",
    [
        DataConfig(name="digits", num_clients=30, partition="dirichlet"),
        DataConfig(name="digits", num_clients=30, partition="shards"),
        DataConfig(name="synthetic", num_clients=30, synthetic=small_synthetic()),
        DataConfig(name="synthetic", num_clients=30, synthetic=small_synthetic(iid=True)),
    ],
    ids=["digits-dirichlet", "digits-shards", "synthetic", "synthetic-iid"],
)
def test_same_seed_same_tensors_different_seed_different(cfg: DataConfig) -> None:
    a, b, other = load_federated(cfg, 7), load_federated(cfg, 7), load_federated(cfg, 8)
    np.testing.assert_array_equal(a.train_sizes, b.train_sizes)
    np.testing.assert_array_equal(a.label_histograms(), b.label_histograms())
    for k in (0, 5, 29):
        assert_same(a.client(k), b.client(k))
    assert any(digest(a.client(k)) != digest(other.client(k)) for k in range(5))
    assert not np.array_equal(a.label_histograms(), other.label_histograms())


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_client_is_the_same_whatever_was_loaded_before(name: str) -> None:
    cfg = DataConfig(
        name=name, num_clients=12, partition="dirichlet" if name == "digits" else None, synthetic=small_synthetic()
    )
    alone = load_federated(cfg, 3).client(9)
    busy = load_federated(cfg, 3)
    for k in [11, 0, 4, 9, 2]:
        busy.client(k)
    busy.label_histograms()
    np.random.seed(0)  # global RNGs must play no part
    torch.manual_seed(0)
    assert_same(busy.client(9), alone)
    assert_same(load_federated(cfg, 3).client(9), alone)


def test_client_is_the_same_in_a_fresh_process() -> None:
    cfgs = {
        "digits": DataConfig(name="digits", num_clients=20, partition="shards"),
        "synthetic": DataConfig(name="synthetic", num_clients=20, synthetic=small_synthetic()),
    }
    here = {n: digest(load_federated(c, 5).client(13)) for n, c in cfgs.items()}
    script = (
        "import hashlib, json, sys, numpy as np\n"
        "from pfl_mpi.data import DataConfig, load_federated\n"
        "np.random.seed(99)\n"
        "out = {}\n"
        "for name, text in json.loads(sys.argv[1]).items():\n"
        "    c = load_federated(DataConfig.model_validate_json(text), 5).client(13)\n"
        "    h = hashlib.sha256()\n"
        "    for t in (c.x_train, c.y_train, c.x_test, c.y_test):\n"
        "        h.update(t.numpy().tobytes())\n"
        "    out[name] = h.hexdigest()\n"
        "print(json.dumps(out))\n"
    )
    arg = json.dumps({n: c.model_dump_json() for n, c in cfgs.items()})
    res = subprocess.run([sys.executable, "-c", script, arg], capture_output=True, text=True, check=True)
    assert json.loads(res.stdout) == here


def test_data_seed_overrides_the_run_seed() -> None:
    cfg = DataConfig(name="digits", num_clients=10, partition="dirichlet", seed=11)
    assert_same(load_federated(cfg, 1).client(4), load_federated(cfg, 2).client(4))
    plain = DataConfig(name="digits", num_clients=10, partition="dirichlet")
    assert_same(load_federated(plain, 11).client(4), load_federated(cfg, 1).client(4))


# ---------------------------------------------------------------- partitioners


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards", "quantity"])
def test_partition_covers_the_pool_once_and_histograms_match_tensors(partition: str) -> None:
    cfg = DataConfig(name="digits", num_clients=20, partition=partition)
    fd = load_federated(cfg, 0)
    assert int(fd.train_sizes.sum() + fd.test_sizes.sum()) == DIGITS_SIZE
    hist = fd.label_histograms()
    assert hist.shape == (20, 10) and hist.dtype == np.int64
    rows = []
    for k in range(20):
        c = fd.client(k)
        np.testing.assert_array_equal(hist[k], np.bincount(c.y_train.numpy(), minlength=10))
        rows.append(torch.cat([c.x_train, c.x_test]).reshape(-1, 64))
    # every sample of the pool lands in exactly one client: the multiset of rows equals the pool's
    from sklearn.datasets import load_digits

    pool = np.sort((load_digits().data / 16).astype(np.float32), axis=0)
    np.testing.assert_array_equal(np.sort(torch.cat(rows).numpy(), axis=0), pool)


def test_partitions_are_permutations_of_the_pool() -> None:
    labels = np.repeat(np.arange(10), 57)  # 570 samples
    rng = np.random.default_rng(0)
    for part in (
        iid(570, 19, 10, rng),
        quantity(570, 19, 10, 1.5, rng),
        dirichlet(labels, 10, 19, 10, 0.3, rng),
        shards(labels, 10, 20, 10, 3, rng),
    ):
        np.testing.assert_array_equal(np.sort(part.indices), np.arange(570))
        assert part.sizes.min() >= 10


def test_iid_sizes_differ_by_at_most_one() -> None:
    fd = load_federated(DataConfig(name="digits", num_clients=100, partition="iid"), 0)
    n = fd.train_sizes + fd.test_sizes
    assert n.max() - n.min() <= 1 and n.sum() == DIGITS_SIZE


@pytest.mark.parametrize(("clients", "c"), [(20, 2), (10, 3), (50, 5), (10, 10)])
def test_shards_give_exactly_c_classes_per_client(clients: int, c: int) -> None:
    fd = load_federated(DataConfig(name="digits", num_clients=clients, partition="shards", classes_per_client=c), 1)
    holders = np.zeros(10, dtype=int)
    for k in range(clients):
        d = fd.client(k)
        present = np.unique(torch.cat([d.y_train, d.y_test]).numpy())
        assert len(present) == c
        holders[present] += 1
    assert holders.tolist() == [c * clients // 10] * 10  # each class is cut into the same number of shards
    sizes = fd.train_sizes + fd.test_sizes
    shard = DIGITS_SIZE / (c * clients)  # classes hold 174..183 samples, so shards are within ~2 of this
    assert sizes.min() >= c * np.floor(shard - 2) and sizes.max() <= c * np.ceil(shard + 2)


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha() -> None:
    def skew(alpha: float) -> float:
        cfg = DataConfig(name="digits", num_clients=50, partition="dirichlet", dirichlet_alpha=alpha)
        return float(np.mean([tv_to_pooled(load_federated(cfg, s).label_histograms()) for s in range(3)]))

    small, medium, large = skew(0.05), skew(1.0), skew(100.0)
    assert small > medium > large
    assert small > 0.75 and large < 0.35  # 29 train samples per client: sampling noise alone gives ~0.22
    fd = load_federated(DataConfig(name="digits", num_clients=50, partition="dirichlet"), 0)
    n = fd.train_sizes + fd.test_sizes
    assert n.max() - n.min() <= 1  # Hsu et al.: equal quotas, only the labels are skewed


def test_quantity_skew_grows_with_sigma_and_keeps_labels_iid() -> None:
    def sizes(sigma: float) -> np.ndarray:
        fd = load_federated(DataConfig(name="digits", num_clients=50, partition="quantity", quantity_sigma=sigma), 0)
        return fd.train_sizes + fd.test_sizes

    flat, skewed = sizes(0.1), sizes(2.0)
    assert flat.sum() == skewed.sum() == DIGITS_SIZE
    assert flat.min() >= 10 and skewed.min() >= 10
    assert skewed.std() / skewed.mean() > 4 * flat.std() / flat.mean()
    fd = load_federated(DataConfig(name="digits", num_clients=10, partition="quantity", quantity_sigma=0.1), 0)
    assert tv_to_pooled(fd.label_histograms()) < 0.25


def test_stratified_split_keeps_each_clients_label_proportions() -> None:
    fd = load_federated(DataConfig(name="digits", num_clients=10, partition="dirichlet", dirichlet_alpha=1.0), 0)
    for k in range(10):
        c = fd.client(k)
        n_test = len(c.y_test)
        all_counts = np.bincount(torch.cat([c.y_train, c.y_test]).numpy(), minlength=10)
        test_counts = np.bincount(c.y_test.numpy(), minlength=10)
        expected = all_counts * n_test / all_counts.sum()
        assert np.all(np.abs(test_counts - expected) <= 1.0 + 1e-9)


def test_test_fraction_sets_the_held_out_share() -> None:
    fd = load_federated(DataConfig(name="digits", num_clients=10, partition="iid", test_fraction=0.5), 0)
    np.testing.assert_array_equal(fd.test_sizes, np.floor((fd.train_sizes + fd.test_sizes) * 0.5 + 0.5))


# ---------------------------------------------------------------- Synthetic(alpha, beta)


def test_synthetic_sizes_follow_the_lognormal_power_law() -> None:
    fd = load_federated(DataConfig(name="synthetic", num_clients=4000), 0)
    n = fd.train_sizes + fd.test_sizes
    assert n.min() >= 50
    extra = n - 50  # int(lognormal(4, 2)): median e^4 ~ 55, 84th percentile e^6 ~ 403
    assert 45 <= np.median(extra) <= 66
    assert 0.13 <= np.mean(extra > np.exp(6)) <= 0.19
    assert n.max() > 100 * np.median(n)  # heavy tail
    capped = load_federated(DataConfig(name="synthetic", num_clients=4000, synthetic={"max_samples": 500}), 0)
    m = capped.train_sizes + capped.test_sizes
    np.testing.assert_array_equal(m, np.minimum(n, 500))


def test_synthetic_inputs_have_the_papers_covariance() -> None:
    syn = SyntheticConfig(size_sigma=0.0, size_offset=3000)  # every client holds int(e^4) + 3000 samples
    fd = load_federated(DataConfig(name="synthetic", num_clients=2, synthetic=syn), 0)
    c = fd.client(1)
    x = torch.cat([c.x_train, c.x_test]).double().numpy()
    assert x.shape == (3054, 60)
    ratio = x.var(axis=0) / np.arange(1, 61) ** -1.2
    assert np.all(np.abs(ratio - 1) < 0.15)


def test_synthetic_beta_spreads_the_clients_inputs_and_iid_removes_label_skew() -> None:
    def client_means(fd: FederatedData) -> np.ndarray:
        return np.array([fd.client(k).x_train.mean().item() for k in range(fd.num_clients)])

    def load(**kw) -> FederatedData:
        return load_federated(DataConfig(name="synthetic", num_clients=60, synthetic=small_synthetic(**kw)), 0)

    s00, s11, s_iid = load(alpha=0, beta=0), load(alpha=1, beta=1), load(iid=True)
    # v_k ~ N(B_k, 1) per coordinate: the spread of client means is ~1/sqrt(60) for beta = 0, ~1 for beta = 1
    assert client_means(s00).std() < 0.25 < 0.6 < client_means(s11).std()
    assert np.abs(client_means(s_iid)).max() < 0.1
    # each non-iid client has its own W_k, so labels are far more skewed than with the shared W of the iid case
    assert tv_to_pooled(s_iid.label_histograms()) < 0.2
    assert tv_to_pooled(s00.label_histograms()) > 0.6 and tv_to_pooled(s11.label_histograms()) > 0.6


def test_synthetic_alpha_shifts_all_logits_alike_as_in_the_paper() -> None:
    # W_k ~ N(u_k, 1), b_k ~ N(u_k, 1) add u_k * (sum(x) + 1) to every class's logit: the argmax, hence y,
    # does not depend on alpha once the other draws are fixed. A faithful implementation must show this.
    def labels(alpha: float) -> np.ndarray:
        cfg = DataConfig(name="synthetic", num_clients=10, synthetic=small_synthetic(alpha=alpha, beta=0.5))
        fd = load_federated(cfg, 0)
        return np.concatenate([fd.client(k).y_train.numpy() for k in range(10)])

    assert np.mean(labels(0.0) == labels(3.0)) > 0.999


def test_loading_is_lazy_and_cheap() -> None:
    import time

    start = time.perf_counter()
    fd = load_federated(DataConfig(name="synthetic", num_clients=200_000), 0)
    assert time.perf_counter() - start < 2.0  # sizes only; no client was generated
    assert fd.num_clients == 200_000 and fd.train_sizes.min() >= 1


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        (dict(name="digits", partition="shards", classes_per_client=11, num_clients=10), "data.classes_per_client"),
        (dict(name="digits", partition="shards", classes_per_client=2, num_clients=33), "data.classes_per_client"),
        (dict(name="digits", partition="shards", classes_per_client=10, num_clients=180), "data.num_clients"),
        (dict(name="digits", partition="shards", classes_per_client=1, num_clients=200), "data.num_clients"),
        (dict(name="digits", partition="iid", num_clients=180), "data.num_clients"),
        (dict(name="digits", partition="dirichlet", num_clients=500), "data.num_clients"),
        (dict(name="digits", partition="quantity", num_clients=200), "data.num_clients"),
        (dict(name="digits", partition="natural"), "data.partition"),
        (dict(name="synthetic", partition="iid"), "data.partition"),
        (dict(name="synthetic", synthetic={"max_samples": 5}), "data.synthetic.max_samples"),
        (dict(name="synthetic", min_samples=60), "data.synthetic.size_offset"),
        (dict(name="file"), "data.path"),
        (dict(name="digits", path="x.npz"), "data.path"),
        (dict(name="file", path="/nonexistent/data.npz"), "data.path"),
    ],
)
def test_impossible_configs_raise_config_error_with_key(cfg: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(**cfg), 0)
    assert info.value.key == key
    assert str(info.value).startswith(key + ": ")


def test_negative_seed_is_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="digits", num_clients=5), -1)
    assert info.value.key == "seed"


@pytest.mark.parametrize(
    "cfg",
    [
        dict(nmae="digits"),
        dict(name="cifar"),
        dict(num_clients=0),
        dict(test_fraction=1.0),
        dict(test_fraction=0.0),
        dict(dirichlet_alpha=0.0),
        dict(min_samples=1),
        dict(mnist1d={"num_samples": 1005}),
        dict(synthetic={"dimension": 60, "alpah": 1}),
    ],
)
def test_static_type_and_range_errors_are_pydantic_errors(cfg: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        DataConfig(**cfg)
