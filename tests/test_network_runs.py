"""Runs with the simulated network (one process): what trains, what the file records, resume, over-selection."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.config import load_config
from pfl_mpi.network import Status
from pfl_mpi.runtime import Engine

from .helpers import committed, tiny_config

TIMINGS = ("seconds", "cpu", "wall", "waiting")  # wall-clock values, never compared (simulated ones are)
NETWORK_ROUNDS = (
    "simulated_round_seconds",
    "simulated_time",
    "clients_selected",
    "clients_unavailable",
    "clients_dropped",
    "clients_missed_deadline",
    "clients_over_selected",
)
STRAGGLERS = {  # lognormal speeds (sigma 1), a deadline, dropout: most rounds lose a client or more
    "network.enabled": "true",
    "network.speed_sigma": 1.0,
    "network.seconds_per_sample": 0.005,
    "network.deadline": 2.0,
    "network.dropout": 0.1,
}


def _datasets(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return {k: v for k, v in out.items() if not _wall_clock(k.rsplit("/", 1)[-1])}


def _wall_clock(name: str) -> bool:
    return any(t in name for t in TIMINGS) and not name.startswith("simulated_")


def _run(cfg, resume: bool = False) -> Engine:
    engine = Engine(cfg, SerialWorld(), resume=resume, show_progress=False)
    assert engine.run() == 0
    return engine


def test_a_network_that_keeps_everyone_changes_nothing_but_adds_its_records(tmp_path):
    """Always available, no dropout, no deadline, no over-selection: the same clients train, bit for bit."""
    _run(tiny_config(tmp_path / "off.h5", "fedper"))
    _run(tiny_config(tmp_path / "on.h5", "fedper", **{"network.enabled": "true"}))
    off, on = _datasets(tmp_path / "off.h5"), _datasets(tmp_path / "on.h5")
    assert set(on) - set(off) == {f"rounds/{k}" for k in NETWORK_ROUNDS} | {
        "clients/network_status",
        "clients/simulated_seconds",
    }
    for name in off:
        np.testing.assert_array_equal(on[name], off[name], err_msg=name)
    status, participated = on["clients/network_status"][:3], on["clients/participated"][:3]
    np.testing.assert_array_equal(status == Status.ARRIVED, participated == 1)
    assert set(np.unique(status)) == {Status.NOT_SELECTED, Status.ARRIVED}


def _stragglers(out: Path, rounds: int, **more):
    sets = {**STRAGGLERS, "network.over_selection": 0.5, "network.availability": 0.9, **more}
    return tiny_config(out, "fedper", rounds=rounds, clients_per_round=4, state_every=1, **sets)


def test_resume_with_the_network_equals_a_straight_run(tmp_path):
    _run(_stragglers(tmp_path / "straight.h5", 5))
    _run(_stragglers(tmp_path / "resumed.h5", 2))
    engine = Engine(_stragglers(tmp_path / "resumed.h5", 5), SerialWorld(), resume=True, show_progress=False)
    assert engine.start_round == 2 and engine.network.clock > 0  # the clock of rounds 0-1, recomputed
    assert engine.run() == 0
    a, b = _datasets(tmp_path / "straight.h5"), _datasets(tmp_path / "resumed.h5")
    assert set(a) == set(b) and "rounds/simulated_time" in a
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)


def test_clients_that_do_not_arrive_keep_their_state_and_pay_their_download(tmp_path):
    cfg = _stragglers(tmp_path / "run.h5", 6, **{"network.deadline": 1.2, "network.dropout": 0.2})
    engine = _run(cfg)
    status = committed(cfg.output_path, "clients", "network_status")
    down = committed(cfg.output_path, "clients", "protocol_bytes_down")
    up = committed(cfg.output_path, "clients", "protocol_bytes_up")
    for code in (Status.DROPPED, Status.MISSED_DEADLINE, Status.OVER_SELECTED, Status.UNAVAILABLE):
        assert (status == code).any(), f"no client {code.name} in 6 rounds: the scenario should show every status"
    payload = 4 * engine.algo.down_numel()
    downloaded = np.isin(status, [Status.ARRIVED, Status.DROPPED, Status.MISSED_DEADLINE, Status.OVER_SELECTED])
    np.testing.assert_array_equal(down, np.where(downloaded, payload, 0))
    np.testing.assert_array_equal(up > 0, status == Status.ARRIVED)
    rounds = committed(cfg.output_path, "rounds", "protocol_bytes_down")
    np.testing.assert_array_equal(rounds, down.sum(axis=1))
    with h5py.File(cfg.output_path, "r") as f:
        heads = f["clients/state/personal"][:6]  # after each round (state_every=1)
        assert f["rounds/num_sampled"][:6].tolist() == (status == Status.ARRIVED).sum(axis=1).tolist()
    for t in range(1, 6):
        changed = np.any(heads[t] != heads[t - 1], axis=1)
        assert not changed[status[t] != Status.ARRIVED].any(), f"round {t}: a client that did not arrive changed"
        assert changed[status[t] == Status.ARRIVED].all()


def test_the_file_shows_who_dropped_and_equals_the_pure_recomputation(tmp_path):
    cfg = _stragglers(tmp_path / "run.h5", 6)
    _run(cfg)
    status = committed(cfg.output_path, "clients", "network_status")
    seconds = committed(cfg.output_path, "clients", "simulated_seconds")
    for name, code in (("clients_dropped", Status.DROPPED), ("clients_missed_deadline", Status.MISSED_DEADLINE)):
        np.testing.assert_array_equal(committed(cfg.output_path, "rounds", name), (status == code).sum(axis=1))
    assert (status == Status.DROPPED).any()
    fresh = Engine(cfg.model_copy(update={"output": str(tmp_path / "again.h5")}), SerialWorld(), show_progress=False)
    clock = committed(cfg.output_path, "rounds", "simulated_time")
    for t in range(6):  # every draw is a pure function of (seed, client, round): the same outcome again
        rn = fresh.network.round(t)
        np.testing.assert_array_equal(status[t][rn.selected], rn.status)
        np.testing.assert_array_equal(seconds[t][rn.selected], rn.seconds.astype(np.float32))
        assert clock[t] == rn.clock
    assert clock.tolist() == np.cumsum(committed(cfg.output_path, "rounds", "simulated_round_seconds")).tolist()


STRAGGLERS_CONFIG = Path(__file__).parents[1] / "configs" / "network" / "stragglers.yaml"


def _digits(out: Path, over_selection: float):
    """configs/network/stragglers.yaml: FedAvg on digits (50 IID clients, 10 per round), lognormal speeds,
    a 2 s deadline and 10% dropout."""
    return load_config(STRAGGLERS_CONFIG, [f"output={out}", f"network.over_selection={over_selection}"])


TARGET = 0.8


def _time_to_target(path: Path) -> float:
    acc, clock = committed(path, "rounds", "test_acc"), committed(path, "rounds", "simulated_time")
    reached = np.flatnonzero(acc >= TARGET)
    assert len(reached), f"{path.name} never reached {TARGET}: {acc.round(3).tolist()}"
    return float(clock[reached[0]])


def test_over_selection_reaches_the_target_in_less_simulated_time(tmp_path):
    for o in (0.0, 0.5):
        _run(_digits(tmp_path / f"over{o}.h5", o))
    plain, over = tmp_path / "over0.0.h5", tmp_path / "over0.5.h5"
    # without over-selection a client is missing in almost every round: the server waits for the deadline
    assert (committed(plain, "rounds", "num_sampled") < 10).mean() >= 0.75
    assert (committed(plain, "rounds", "simulated_round_seconds") == 2.0).mean() >= 0.75
    # with it, 15 are sampled and the round ends at the 10th arrival
    assert committed(over, "rounds", "clients_selected").tolist() == [15.0] * 12
    assert (committed(over, "rounds", "num_sampled") == 10).mean() >= 0.9
    assert committed(over, "rounds", "simulated_round_seconds").max() < 2.0
    assert _time_to_target(over) < 0.6 * _time_to_target(plain)
    dropped = committed(plain, "clients", "network_status") == Status.DROPPED
    assert dropped.sum() == committed(plain, "rounds", "clients_dropped").sum() > 0


@pytest.mark.parametrize("algorithm", ["fedavg", "topk", "pfedhn"])
def test_a_round_nobody_arrives_at_leaves_the_model_unchanged(tmp_path, algorithm):
    """Two sampled clients, each dropping out with probability 0.5: rounds 0, 2 and 3 are empty (seed 0)."""
    cfg = tiny_config(
        tmp_path / "run.h5",
        algorithm,
        rounds=4,
        clients_per_round=2,
        **{"network.enabled": "true", "network.dropout": 0.5},
    )
    _run(cfg)
    sampled = committed(cfg.output_path, "rounds", "num_sampled")
    assert sampled.tolist() == [0, 1, 0, 0]
    loss, acc = committed(cfg.output_path, "rounds", "train_loss"), committed(cfg.output_path, "rounds", "test_acc")
    assert np.isnan(loss[sampled == 0]).all() and np.isfinite(loss[1])
    assert acc[3] == acc[2] == acc[1]  # nothing trained after round 1: the same models are evaluated
    assert committed(cfg.output_path, "clients", "protocol_bytes_up")[sampled == 0].sum() == 0


def test_cli_runs_on_1_2_and_4_ranks_record_the_same_network(tmp_path):
    """Through the command line: the network's records are equal on any number of ranks, bit for bit."""
    sets = {**STRAGGLERS, "network.over_selection": 0.5, "network.availability": 0.8, "rounds": 4}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    common = ["--set", "data.num_clients=20", "--set", "clients_per_round=6", "--set", "model.hidden=[16]"]
    files = {}
    for p in (1, 2, 4):
        files[p] = tmp_path / f"p{p}.h5"
        run = subprocess.run(
            [sys.executable, "-m", "pfl_mpi", "run", "-n", str(p), "--out", str(files[p]), "--quiet", *common, *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
    status = committed(files[1], "clients", "network_status")
    assert len(np.unique(status)) >= 4
    for p in (2, 4):
        for group, name in [("clients", n) for n in ("network_status", "simulated_seconds", "protocol_bytes_down")] + [
            ("rounds", n) for n in NETWORK_ROUNDS
        ]:
            np.testing.assert_array_equal(committed(files[p], group, name), committed(files[1], group, name))
        np.testing.assert_allclose(
            committed(files[p], "rounds", "test_acc"), committed(files[1], "rounds", "test_acc"), rtol=1e-5, atol=1e-6
        )


def test_a_trace_gives_client_k_row_k_mod_m(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative trace path is read from the working directory, then kept absolute
    Path("devices.csv").write_text("client,down_mbps,up_mbps,latency_ms,speed\n0,8,8,0,1\n1,8,8,100,0.5\n2,80,8,0,4\n")
    cfg = tiny_config(tmp_path / "run.h5", "fedavg", **{"network.enabled": "true", "network.trace": "devices.csv"})
    assert cfg.network.trace == str(tmp_path.resolve() / "devices.csv")
    engine = _run(cfg)
    sizes, payload = engine.data.train_sizes, 4.0 * engine.algo.down_numel()
    row = np.arange(10) % 3
    down = np.array([8.0, 8.0, 80.0])[row]
    latency, speed = np.array([0.0, 0.1, 0.0])[row], np.array([1.0, 0.5, 4.0])[row]
    expected = latency + payload * 8 / (down * 1e6) + 0.001 * sizes / speed + latency + payload * 8 / 8e6
    seconds = committed(cfg.output_path, "clients", "simulated_seconds")
    for t in range(3):
        selected = np.isfinite(seconds[t])
        np.testing.assert_allclose(seconds[t][selected], expected[selected], rtol=1e-6)
