"""Client placement, per-round sampling, exchange plans, and the seeds of random streams."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pfl_mpi.runtime.placement import place_clients, sample_clients
from pfl_mpi.seeding import client_generator, derive_seed
from pfl_mpi.wire.plan import Plan, make_plan

# -- place_clients ----------------------------------------------------------------------------


def _loads(sizes: np.ndarray, host: np.ndarray, workers: list[int]) -> np.ndarray:
    return np.array([sizes[host == r].sum() for r in workers])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("workers", [[0], [1], [1, 2], [1, 2, 3], list(range(1, 8))])
def test_place_clients_balances_samples(seed, workers):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 500, size=int(rng.integers(1, 60)))
    host = place_clients(sizes, workers)
    assert host.shape == sizes.shape
    assert set(host.tolist()) <= set(workers)  # every client on a worker
    loads = _loads(sizes, host, workers)
    assert loads.sum() == sizes.sum()
    assert loads.max() - loads.min() <= sizes.max()


def test_place_clients_spreads_equal_clients_evenly():
    host = place_clients(np.full(12, 7), [1, 2, 3])
    assert np.bincount(host, minlength=4).tolist() == [0, 4, 4, 4]


def test_place_clients_lpt_example():
    # largest first onto the lightest rank, ties to the earlier worker:
    # 9 -> 1 (9), 8 -> 2 (8), 5 -> 2 (13), 4 -> 1 (13), 3 -> 1 (tie, 16)
    sizes = np.array([4, 9, 5, 8, 3])
    host = place_clients(sizes, [1, 2])
    assert host.tolist() == [1, 1, 2, 2, 1]
    assert _loads(sizes, host, [1, 2]).tolist() == [16, 13]


def test_place_clients_is_deterministic():
    sizes = np.random.default_rng(3).integers(1, 100, size=40)
    a = place_clients(sizes, [1, 2, 3])
    b = place_clients(sizes.copy(), [1, 2, 3])
    np.testing.assert_array_equal(a, b)


def test_place_clients_more_workers_than_clients():
    host = place_clients(np.array([5, 3]), [1, 2, 3, 4])
    assert host.tolist() == [1, 2]


# -- sample_clients ---------------------------------------------------------------------------


def test_sample_clients_shape_sorted_unique():
    for t in range(20):
        s = sample_clients(7, t, 50, 10)
        assert len(s) == 10
        assert len(np.unique(s)) == 10
        assert np.all(np.diff(s) > 0)
        assert s.min() >= 0 and s.max() < 50


def test_sample_clients_depends_only_on_seed_and_round():
    a = sample_clients(7, 3, 50, 10)
    sample_clients(7, 4, 50, 10)  # no hidden state between calls
    np.random.seed(123)  # the global numpy RNG plays no part
    torch.manual_seed(5)
    b = sample_clients(7, 3, 50, 10)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sample_clients(8, 3, 50, 10))


def test_sample_clients_differs_across_rounds():
    samples = {tuple(sample_clients(0, t, 100, 10)) for t in range(10)}
    assert len(samples) == 10


def test_sample_clients_all_when_per_round_covers_everyone():
    np.testing.assert_array_equal(sample_clients(0, 5, 9, 9), np.arange(9))
    np.testing.assert_array_equal(sample_clients(0, 5, 9, 20), np.arange(9))


def test_sample_clients_covers_clients_over_rounds():
    seen = np.concatenate([sample_clients(1, t, 20, 5) for t in range(60)])
    assert set(seen.tolist()) == set(range(20))


# -- make_plan --------------------------------------------------------------------------------


def test_make_plan_groups_by_rank_in_rank_order():
    host = np.array([2, 1, 2, 3, 1, 1, 3, 2])
    plan = make_plan(np.array([7, 0, 5, 3, 1, 6]), host, 4)
    assert isinstance(plan, Plan)
    # rank 1 hosts 1, 4, 5; rank 2: 0, 2, 7; rank 3: 3, 6
    assert plan.order == [1, 5, 0, 7, 3, 6]
    assert plan.per_rank == [0, 2, 2, 2]
    assert plan.of_rank(0) == []
    assert plan.of_rank(1) == [1, 5]
    assert plan.of_rank(2) == [0, 7]
    assert plan.of_rank(3) == [3, 6]
    assert sum(plan.per_rank) == len(plan.order)


def test_make_plan_of_rank_matches_host():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 50, size=30)
    workers = [1, 2, 3]
    host = place_clients(sizes, workers)
    clients = sample_clients(0, 2, 30, 12)
    plan = make_plan(clients, host, 4)
    assert sorted(plan.order) == clients.tolist()
    for r in range(4):
        mine = plan.of_rank(r)
        assert mine == sorted(int(k) for k in clients if host[k] == r)
    assert list(itertools.chain.from_iterable(plan.of_rank(r) for r in range(4))) == plan.order


def test_make_plan_single_rank_and_empty():
    host = np.zeros(5, dtype=np.int64)
    plan = make_plan(np.array([4, 2]), host, 1)
    assert plan.order == [2, 4] and plan.per_rank == [2] and plan.of_rank(0) == [2, 4]
    empty = make_plan(np.array([], dtype=np.int64), host, 3)
    assert empty.order == [] and empty.per_rank == [0, 0, 0] and empty.of_rank(2) == []


# -- seeding ----------------------------------------------------------------------------------


def test_derive_seed_deterministic_and_in_range():
    assert derive_seed(0, 2, 5, 3) == derive_seed(0, 2, 5, 3)
    for keys in [(0,), (1, 2), (2**31, 7, 9), (5, 2, 10**6, 999)]:
        s = derive_seed(*keys)
        assert isinstance(s, int)
        assert 0 <= s < 2**63


def test_derive_seed_distinct_for_distinct_keys_of_one_length():
    keys = list(itertools.product(range(3), range(3), range(12), range(6)))
    seeds = {derive_seed(*k) for k in keys}
    assert len(seeds) == len(keys)


def test_derive_seed_distinct_for_keys_of_different_length():
    """Distinct keys give distinct seeds, even when one key is another padded with zeros."""
    assert derive_seed(5, 1) != derive_seed(5, 1, 0)
    assert derive_seed(0) != derive_seed(0, 0)


def test_client_generator_reproducible():
    a = torch.randperm(50, generator=client_generator(3, 7, 2))
    b = torch.randperm(50, generator=client_generator(3, 7, 2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # independent of the global torch RNG
    torch.manual_seed(11)
    c = torch.randperm(50, generator=client_generator(3, 7, 2))
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_client_generator_differs_by_round_client_and_seed():
    base = torch.randperm(50, generator=client_generator(3, 7, 2))
    for other in [(3, 7, 3), (3, 8, 2), (4, 7, 2)]:
        assert not torch.equal(base, torch.randperm(50, generator=client_generator(*other)))
