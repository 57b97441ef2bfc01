"""The simulated network on its own: pure draws, the time formulas, the statuses, availability, traces."""

from __future__ import annotations

import numpy as np
import pytest

from pfl_mpi.network import (
    Devices,
    NetworkConfig,
    NetworkSimulator,
    Status,
    availability,
    client_seconds,
    draw_devices,
    plan_round,
    read_trace,
    selected_per_round,
)
from pfl_mpi.network.draws import normal, round_uniform, uniform

ON = {"enabled": True}


def _net(**keys) -> NetworkConfig:
    return NetworkConfig(**ON, **keys)


def _devices(speed, down=8.0, up=8.0, latency=0.0, phase=None) -> Devices:
    """Devices 0..n-1 with the given speeds (bandwidths in Mbit/s: 8 Mbit/s moves 1e6 bytes per second)."""
    n = len(speed)
    column = lambda v: np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)).copy()  # noqa: E731
    return Devices(
        np.arange(n), column(down), column(up), column(latency), column(speed), column(0.0 if phase is None else phase)
    )


def _plan(cfg, devices, quota, work=1.0, down=0, up=0, seed=0, t=0):
    n = len(devices.clients)
    full = lambda v: np.full(n, v, dtype=np.float64)  # noqa: E731
    return plan_round(cfg, devices, seed, t, quota, full(work), full(down), full(up))


# -- draws ---------------------------------------------------------------------------------------------
def test_draws_are_pure_functions_of_their_keys():
    assert uniform(1, 2, 3) == uniform(1, 2, 3) != uniform(1, 2, 4)
    assert normal(5, 6) == normal(5, 6)
    values = [uniform(0, k) for k in range(20000)]
    assert 0.0 <= min(values) and max(values) < 1.0
    assert abs(np.mean(values) - 0.5) < 0.01
    normals = [normal(0, k) for k in range(20000)]
    assert abs(np.mean(normals)) < 0.03 and abs(np.std(normals) - 1.0) < 0.03


def test_device_of_a_client_depends_only_on_seed_and_client():
    cfg = _net(bandwidth_sigma=0.5, latency_sigma=0.3, speed_sigma=1.0)
    everyone = draw_devices(cfg, 7, range(50))
    some = draw_devices(cfg, 7, [31, 4, 17])  # any subset, any order: the same devices
    for name in ("down_mbps", "up_mbps", "latency_ms", "speed", "phase"):
        np.testing.assert_array_equal(getattr(some, name), getattr(everyone, name)[[31, 4, 17]])
    np.testing.assert_array_equal(everyone.take([31, 4, 17]).speed, some.speed)
    assert not np.array_equal(draw_devices(cfg, 8, range(50)).speed, everyone.speed)


def test_lognormal_devices_centre_on_the_medians():
    cfg = _net(down_mbps=40, up_mbps=4, latency_ms=30, speed=2, bandwidth_sigma=0.5, latency_sigma=0.2, speed_sigma=1)
    d = draw_devices(cfg, 0, range(4000))
    for values, median, sigma in (
        (d.down_mbps, 40, 0.5),
        (d.up_mbps, 4, 0.5),
        (d.latency_ms, 30, 0.2),
        (d.speed, 2, 1.0),
    ):
        assert abs(np.median(values) / median - 1) < 0.05
        assert abs(np.std(np.log(values)) - sigma) < 0.05 * sigma
    same = draw_devices(_net(speed=3.0), 0, range(5))  # sigma 0: every client is the median
    assert same.speed.tolist() == [3.0] * 5 and same.down_mbps.tolist() == [20.0] * 5


def test_round_draws_depend_on_seed_client_and_round_only():
    cfg = _net(availability=0.7, dropout=0.3)
    devices = draw_devices(cfg, 3, range(40))
    whole = _plan(cfg, devices, quota=40, seed=3, t=5)
    part = _plan(cfg, devices.take([2, 9, 33]), quota=40, seed=3, t=5)
    np.testing.assert_array_equal(part.status, whole.status[[2, 9, 33]])
    np.testing.assert_array_equal(_plan(cfg, devices, 40, seed=3, t=5).status, whole.status)
    assert not np.array_equal(_plan(cfg, devices, 40, seed=3, t=6).status, whole.status)
    assert round_uniform(3, 2, 5, 0) == round_uniform(3, 2, 5, 0)


# -- formulas ------------------------------------------------------------------------------------------
def test_client_seconds_formula():
    """latency + 8 bytes / bandwidth down, seconds_per_sample x work / speed, latency + 8 bytes / bandwidth up."""
    cfg = _net(seconds_per_sample=0.002)
    devices = _devices(speed=[2.0, 0.5], down=20.0, up=5.0, latency=50.0)
    seconds = client_seconds(cfg, devices, np.array([100.0, 100.0]), np.array([1e6, 1e6]), np.array([1e6, 0.0]))
    down, up = 0.05 + 8e6 / 20e6, 0.05 + 8e6 / 5e6
    np.testing.assert_allclose(seconds, [down + 0.1 + up, down + 0.4 + 0.05], rtol=1e-15)


def test_selected_per_round():
    assert selected_per_round(10, 0.0, 100) == 10
    assert selected_per_round(10, 0.3, 100) == 13  # not 14: 10 x 1.3 is 13.000000000000002 in floating point
    assert selected_per_round(10, 0.25, 100) == 13
    assert selected_per_round(10, 0.5, 12) == 12


# -- statuses and the round's time ---------------------------------------------------------------------
def test_first_k_arrivals_are_kept_and_the_round_ends_at_the_kth():
    cfg = _net(seconds_per_sample=1.0)
    rn = _plan(cfg, _devices(speed=[1.0, 4.0, 2.0, 0.5, 8.0]), quota=3)  # seconds 1, .25, .5, 2, .125
    np.testing.assert_array_equal(rn.seconds, [1.0, 0.25, 0.5, 2.0, 0.125])
    assert rn.status.tolist() == [Status.OVER_SELECTED, 1, 1, Status.OVER_SELECTED, 1]
    assert rn.kept.tolist() == [1, 2, 4] and rn.downloaded.tolist() == [0, 3]
    assert rn.round_seconds == 0.5 and rn.clock == 0.5


def test_deadline_cuts_late_clients_and_the_server_waits_for_it():
    cfg = _net(seconds_per_sample=1.0, deadline=1.5)
    rn = _plan(cfg, _devices(speed=[1.0, 4.0, 0.5, 0.25]), quota=3)  # 1, .25, 2, 4 seconds
    assert rn.status.tolist() == [1, 1, Status.MISSED_DEADLINE, Status.MISSED_DEADLINE]
    assert rn.round_seconds == 1.5  # two of three arrived: the server waited until the deadline
    assert rn.scalars()["clients_missed_deadline"] == 2.0


def test_without_deadline_the_server_waits_for_every_available_client():
    cfg = _net(seconds_per_sample=1.0, dropout=1.0)  # everyone drops out: nobody trains
    rn = _plan(cfg, _devices(speed=[1.0, 0.25]), quota=2)
    assert rn.status.tolist() == [Status.DROPPED, Status.DROPPED] and rn.kept.tolist() == []
    assert rn.round_seconds == 4.0
    nobody = _plan(_net(availability=0.0), _devices(speed=[1.0, 1.0]), quota=2)
    assert nobody.status.tolist() == [Status.UNAVAILABLE] * 2 and nobody.round_seconds == 0.0
    assert np.isnan(nobody.seconds).all() and nobody.downloaded.tolist() == []


def test_ties_are_broken_by_client_id():
    rn = _plan(_net(), _devices(speed=[1.0] * 4), quota=2)
    assert rn.kept.tolist() == [0, 1]


def test_client_tables_and_scalars():
    cfg = _net(seconds_per_sample=1.0, deadline=1.5)
    devices = _devices(speed=[1.0, 4.0, 0.5])
    rn = plan_round(cfg, devices.take([0, 1, 2]), 0, 0, 1, np.ones(3), np.zeros(3), np.zeros(3), clock=10.0)
    tables = rn.client_tables(5)
    assert tables["network_status"].tolist() == [Status.OVER_SELECTED, 1, Status.MISSED_DEADLINE, 0, 0]
    assert tables["network_status"].dtype == np.int64
    np.testing.assert_array_equal(tables["simulated_seconds"][:3], [1.0, 0.25, 2.0])
    assert np.isnan(tables["simulated_seconds"][3:]).all()
    s = rn.scalars()
    assert s["simulated_round_seconds"] == 0.25 and s["simulated_time"] == 10.25
    assert (s["clients_selected"], s["clients_over_selected"], s["clients_missed_deadline"]) == (3.0, 1.0, 1.0)


def test_dropout_and_availability_rates():
    cfg = _net(availability=0.8, dropout=0.25)
    devices = draw_devices(cfg, 1, range(500))
    statuses = np.concatenate([_plan(cfg, devices, quota=500, seed=1, t=t).status for t in range(10)])
    assert abs(np.mean(statuses == Status.UNAVAILABLE) - 0.2) < 0.02
    available = statuses != Status.UNAVAILABLE
    assert abs(np.mean(statuses[available] == Status.DROPPED) - 0.25) < 0.02


def test_periodic_availability():
    cfg = _net(availability=0.5, availability_amplitude=0.5, availability_period=24)
    phase = np.array([0.0, 0.25, 0.5])
    assert availability(cfg, phase, 0).tolist() == pytest.approx([0.5, 1.0, 0.5])
    assert availability(cfg, phase, 6).tolist() == pytest.approx([1.0, 0.5, 0.0])
    for t in range(24):
        np.testing.assert_allclose(availability(cfg, phase, t), availability(cfg, phase, t + 24), atol=1e-12)
    assert np.mean([availability(cfg, phase, t) for t in range(24)]) == pytest.approx(0.5)
    clipped = _net(availability=0.9, availability_amplitude=0.5, availability_period=10)
    assert availability(clipped, phase, 0).max() == 1.0
    assert availability(_net(availability=0.3), phase, 7).tolist() == [0.3] * 3


# -- the simulator -------------------------------------------------------------------------------------
def _sample(seed, t, n, count):
    return np.sort(np.random.default_rng([seed, t]).choice(n, size=count, replace=False))


def _simulator(start_round=0, **keys):
    cfg = _net(speed_sigma=1.0, seconds_per_sample=0.01, deadline=1.0, dropout=0.1, over_selection=0.5, **keys)
    sizes = np.arange(20, 60)
    return NetworkSimulator(
        cfg, 4, 6, sizes, 2, lambda c: (np.full(len(c), 4000), np.full(len(c), 1000)), _sample, start_round
    )


def test_simulator_over_selects_and_keeps_the_clock():
    sim = _simulator()
    rounds = [sim.round(t) for t in range(8)]
    assert sim.per_round == 9 and all(len(r.selected) == 9 and len(r.kept) <= 6 for r in rounds)
    assert rounds[-1].clock == sum(r.round_seconds for r in rounds)  # added in round order
    with pytest.raises(RuntimeError, match="round 8 next"):
        sim.round(3)
    resumed = _simulator(start_round=5)  # replays rounds 0..4: the same clock, bit for bit
    assert resumed.clock == rounds[4].clock
    later = resumed.round(5)
    np.testing.assert_array_equal(later.status, rounds[5].status)
    assert later.clock == rounds[5].clock


# -- traces ------------------------------------------------------------------------------------------
def test_trace_rows_are_reused_cyclically(tmp_path):
    path = tmp_path / "devices.csv"
    path.write_text("client,down_mbps,up_mbps,latency_ms,speed,note\n1,10,2,40,0.5,x\n0,100,20,5,2,y\n")
    table = read_trace(path)
    assert table["speed"].tolist() == [2.0, 0.5] and table["latency_ms"].tolist() == [5.0, 40.0]
    devices = draw_devices(_net(trace=str(path)), 0, range(5))
    assert devices.speed.tolist() == [2.0, 0.5, 2.0, 0.5, 2.0]
    assert devices.down_mbps.tolist() == [100.0, 10.0, 100.0, 10.0, 100.0]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (None, "cannot read the trace"),
        ("", "no device rows"),
        ("client,down_mbps,up_mbps,speed\n0,1,1,1\n", "lacks the column"),
        ("client,down_mbps,up_mbps,latency_ms,speed\n0,1,1,1,fast\n", "speed is 'fast'"),
        ("client,down_mbps,up_mbps,latency_ms,speed\n0,1,1,1,1\n0,1,1,1,1\n", "0..1 once each"),
        ("client,down_mbps,up_mbps,latency_ms,speed\n0,0,1,1,1\n", "down_mbps is 0.0"),
        ("client,down_mbps,up_mbps,latency_ms,speed\n0,1,1,-1,1\n", "non-negative"),
        ("client,down_mbps,up_mbps,latency_ms,speed\n0,1,inf,1,1\n", "up_mbps is inf"),
    ],
)
def test_broken_traces_name_the_file(tmp_path, text, match):
    path = tmp_path / "trace.csv"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        read_trace(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
