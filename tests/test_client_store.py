"""The per-client state table of a worker: initial values, writable views, pack/unpack."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pfl_mpi.runtime.client_store import ClientStore

SPEC = {"personal": 3, "momentum": 2, "extra": 4}
CLIENTS = [5, 2, 9, 11]


def _init(k: int) -> dict[str, torch.Tensor]:
    return {
        "personal": torch.full((3,), float(k)),
        "momentum": torch.arange(2, dtype=torch.float32) - k,
        "extra": torch.linspace(0, 1, 4) * k,
    }


@pytest.fixture
def store() -> ClientStore:
    return ClientStore(SPEC, CLIENTS, _init)


def test_init_values_per_client(store):
    assert store.numel == 9
    for k in CLIENTS:
        views = store.views(k)
        assert list(views) == list(SPEC)
        for name, value in _init(k).items():
            torch.testing.assert_close(views[name], value, rtol=0, atol=0)
            assert views[name].dtype == torch.float32


def test_unknown_client_fails(store):
    with pytest.raises(KeyError):
        store.views(3)


def test_views_are_writable_and_persist(store):
    store.views(2)["personal"].copy_(torch.tensor([7.0, 8.0, 9.0]))
    store.views(2)["momentum"].add_(1.0)
    torch.testing.assert_close(store.views(2)["personal"], torch.tensor([7.0, 8.0, 9.0]))
    torch.testing.assert_close(store.views(2)["momentum"], torch.tensor([-1.0, 0.0]))
    # other clients untouched
    for k in (5, 9, 11):
        torch.testing.assert_close(store.views(k)["personal"], _init(k)["personal"], rtol=0, atol=0)
        torch.testing.assert_close(store.views(k)["momentum"], _init(k)["momentum"], rtol=0, atol=0)


def test_pack_layout(store):
    packed = store.pack([9, 5])
    assert packed.shape == (2, 9) and packed.dtype == np.float32
    for j, k in enumerate([9, 5]):
        expected = torch.cat([_init(k)[name] for name in SPEC]).numpy()
        np.testing.assert_array_equal(packed[j], expected)


def test_pack_unpack_round_trip(store):
    rng = np.random.default_rng(0)
    for k in CLIENTS:
        for v in store.views(k).values():
            v.copy_(torch.from_numpy(rng.standard_normal(v.shape[0]).astype(np.float32)))
    order = [11, 2, 5, 9]
    packed = store.pack(order)
    other = ClientStore(SPEC, CLIENTS, lambda k: {n: torch.zeros(m) for n, m in SPEC.items()})
    other.unpack(order, packed)
    for k in CLIENTS:
        for name in SPEC:
            torch.testing.assert_close(other.views(k)[name], store.views(k)[name], rtol=0, atol=0)
    np.testing.assert_array_equal(other.pack(CLIENTS), store.pack(CLIENTS))


def test_unpack_a_subset(store):
    rows = np.arange(18, dtype=np.float32).reshape(2, 9)
    store.unpack([11, 5], rows)
    np.testing.assert_array_equal(store.pack([11]), rows[:1])
    np.testing.assert_array_equal(store.pack([5]), rows[1:])
    torch.testing.assert_close(store.views(5)["momentum"], torch.tensor([12.0, 13.0]))
    torch.testing.assert_close(store.views(5)["extra"], torch.tensor([14.0, 15.0, 16.0, 17.0]))
    torch.testing.assert_close(store.views(2)["personal"], _init(2)["personal"], rtol=0, atol=0)
    # the unpacked rows do not alias the caller's array
    rows[:] = -1
    assert float(store.views(11)["personal"][0]) == 0.0


def test_empty_spec():
    store = ClientStore({}, [0, 1, 2], lambda k: {})
    assert store.numel == 0
    assert store.views(1) == {}
    packed = store.pack([2, 0])
    assert packed.shape == (2, 0)
    store.unpack([2, 0], packed)


def test_no_clients():
    store = ClientStore(SPEC, [], _init)
    assert store.pack([]).shape == (0, 9)
