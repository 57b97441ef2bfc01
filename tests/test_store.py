"""The run file without MPI: create, append rounds, commit, checkpoint slots, snapshots, reopen."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pfl_mpi.store import RunWriter, open_run, read_clients, read_config_text, read_summary

N = 6
SPEC = {"a": 3, "b": 2}
P, L = 2, 4  # ranks, comm labels


def _init(k: int) -> dict[str, np.ndarray]:
    return {"a": np.full(3, k, dtype=np.float32), "b": np.array([k, -k], dtype=np.float32)}


def _create(path, spec=SPEC) -> RunWriter:
    attrs = {
        "name": "t",
        "config": "rounds: 3\nseed: 1\n",
        "algorithm": "fedavg",
        "seed": 1,
        "rounds_planned": 3,
        "hosts": ["h0", "h1"],
        "versions": {"pfl_mpi": "0"},
        "comm_labels": ["a", "b", "c", "d"],
    }
    partition = {"train_sizes": np.arange(1, N + 1), "label_histograms": np.ones((N, 3), dtype=np.int64)}
    return RunWriter.create(path, attrs, partition, spec, _init, N)


def _append(writer: RunWriter, t: int, scalars: dict[str, float]) -> dict:
    clients = {
        "participated": np.arange(N) % 2 == t % 2,
        "loss": np.arange(N, dtype=np.float64) + 10 * t,
    }
    comm = {"bytes_sent": np.full((P, L), float(t)), "calls": np.ones((P, L))}
    ranks = {"wall": np.array([t, t + 0.5])}
    writer.append_round(t, scalars, clients, comm, ranks)
    return clients


@pytest.fixture
def path(tmp_path):
    return tmp_path / "sub" / "run.h5"


def test_create_writes_attrs_partition_and_initial_states(path):
    _create(path).close("completed")
    summary = read_summary(path)
    assert summary.rounds_completed == 0
    assert summary.rounds == {}
    a = summary.attrs
    assert a["name"] == "t" and a["algorithm"] == "fedavg" and a["seed"] == 1
    assert a["hosts"] == ["h0", "h1"]
    assert a["versions"] == {"pfl_mpi": "0"}
    assert a["status"] == "completed"
    assert read_config_text(path) == "rounds: 3\nseed: 1\n"
    with open_run(path) as f:
        np.testing.assert_array_equal(f["partition/train_sizes"][...], np.arange(1, N + 1))
        for slot in ("slot0", "slot1"):
            for name in SPEC:
                table = f[f"checkpoint/{slot}/clients/{name}"][...]
                np.testing.assert_array_equal(table, np.stack([_init(k)[name] for k in range(N)]))


def test_open_run_rejects_other_files(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["x"] = 1
    with pytest.raises(ValueError, match="not a pfl_mpi run file"):
        read_summary(other)


def test_append_rounds_and_commit(path):
    w = _create(path)
    c0 = _append(w, 0, {"loss": 1.0, "acc": 0.5})
    w.commit(0)
    c1 = _append(w, 1, {"loss": 2.0, "extra": 7.0})  # acc missing, extra new
    w.commit(1)
    w.set_round_value(1, "loss", 2.5)
    w.close("completed")

    s = read_summary(path)
    assert s.rounds_completed == 2
    np.testing.assert_array_equal(s.rounds["loss"], [1.0, 2.5])
    assert s.rounds["acc"][0] == 0.5 and np.isnan(s.rounds["acc"][1])
    assert np.isnan(s.rounds["extra"][0]) and s.rounds["extra"][1] == 7.0
    part = read_clients(path, "participated")
    assert part.dtype == np.uint8
    np.testing.assert_array_equal(part, np.stack([c0["participated"], c1["participated"]]).astype(np.uint8))
    np.testing.assert_allclose(read_clients(path, "loss"), np.stack([c0["loss"], c1["loss"]]))
    with open_run(path) as f:
        assert f["comm/bytes_sent"].shape == (2, P, L)
        np.testing.assert_array_equal(f["comm/bytes_sent"][1], np.ones((P, L)))
        np.testing.assert_array_equal(f["ranks/wall"][...], [[0, 0.5], [1, 1.5]])
        assert f.attrs["status"] == "completed"


def test_readers_see_committed_rounds_only(path):
    w = _create(path)
    _append(w, 0, {"loss": 1.0})
    w.commit(0)
    _append(w, 1, {"loss": 2.0})  # in flight: not committed
    w.f.flush()
    w.f.close()  # killed
    with h5py.File(path, "r") as f:
        assert f["rounds/loss"].shape[0] >= 2  # spare or uncommitted rows stay in a killed file
    s = read_summary(path)
    assert s.rounds_completed == 1
    np.testing.assert_array_equal(s.rounds["loss"], [1.0])
    assert read_clients(path, "loss").shape == (1, N)


def _rows(clients, round_):
    """Distinct values for each (client, round)."""
    return {
        "a": np.stack([np.full(3, 100 * (round_ + 1) + k, dtype=np.float32) for k in clients]).reshape(-1, 3),
        "b": np.stack([np.array([k, round_], dtype=np.float32) for k in clients]).reshape(-1, 2),
    }


def _slot(source, slot):
    """(round, server, client tables) of a checkpoint slot, from a path or an open file."""
    if not isinstance(source, h5py.File):
        with open_run(source) as f:
            return _slot(f, slot)
    g = source[f"checkpoint/slot{slot}"]
    return (
        int(g.attrs["round"]),
        {k: v[...] for k, v in g["server"].items()},
        {k: v[...] for k, v in g["clients"].items()},
    )


def test_checkpoint_slots_alternate_and_stay_current(path):
    w = _create(path)
    truth = {name: np.stack([_init(k)[name] for k in range(N)]) for name in SPEC}
    changed = [[3, 1], [0, 3], [5], [2, 4, 0]]  # unsorted on purpose
    history = []
    for t, clients in enumerate(changed):
        rows = _rows(clients, t)
        for name in SPEC:
            truth[name][clients] = rows[name]
        w.checkpoint(t, {"w": np.full(4, t, dtype=np.float32), "step": np.array(t)}, clients, rows)
        w.commit(t)
        history.append({k: v.copy() for k, v in truth.items()})
        round_, server, tables = _slot(w.f, t % 2)
        assert round_ == t
        np.testing.assert_array_equal(server["w"], np.full(4, t))
        assert int(server["step"]) == t
        for name in SPEC:  # the slot of round t holds the full state after round t
            np.testing.assert_array_equal(tables[name], truth[name])
        if t >= 1:  # the other slot still holds round t-1, untouched
            other_round, other_server, other_tables = _slot(w.f, (t - 1) % 2)
            assert other_round == t - 1
            np.testing.assert_array_equal(other_server["w"], np.full(4, t - 1))
            for name in SPEC:
                np.testing.assert_array_equal(other_tables[name], history[t - 1][name])
    w.close("completed")


def _no_rows() -> dict[str, np.ndarray]:
    return {n: np.zeros((0, m), np.float32) for n, m in SPEC.items()}


def test_checkpoint_server_state_may_change_shape(path):
    w = _create(path)
    w.checkpoint(0, {"w": np.zeros(3, dtype=np.float32)}, [], _no_rows())
    w.checkpoint(2, {"w": np.ones(5, dtype=np.float32)}, [], _no_rows())
    w.close("running")
    _, server, _ = _slot(path, 0)
    np.testing.assert_array_equal(server["w"], np.ones(5))


def test_snapshot_copies_current_slot(path):
    w = _create(path)
    truth = {name: np.stack([_init(k)[name] for k in range(N)]) for name in SPEC}
    snaps = []
    for t, clients in enumerate([[1], [2, 0], [4]]):
        rows = _rows(clients, t)
        for name in SPEC:
            truth[name][clients] = rows[name]
        w.checkpoint(t, {"w": np.full(2, t, dtype=np.float32)}, clients, rows)
        if t != 1:
            w.snapshot(t, {"shared": np.full(4, 10.0 + t, dtype=np.float32)})
            snaps.append((t, {k: v.copy() for k, v in truth.items()}))
        w.commit(t)
    w.close("completed")
    with open_run(path) as f:
        np.testing.assert_array_equal(f["global/state/round"][...], [0, 2])
        np.testing.assert_array_equal(f["clients/state/round"][...], [0, 2])
        np.testing.assert_array_equal(f["global/state/shared"][...], [np.full(4, 10.0), np.full(4, 12.0)])
        for s, (_, expected) in enumerate(snaps):
            for name in SPEC:
                assert f[f"clients/state/{name}"].shape == (2, N, SPEC[name])
                np.testing.assert_array_equal(f[f"clients/state/{name}"][s], expected[name])


def _three_rounds_then_crash(path) -> dict:
    """Commit rounds 0, 1, 2 (snapshot at 1); write round 3 fully but do not commit it (a crash)."""
    w = _create(path)
    truth = {name: np.stack([_init(k)[name] for k in range(N)]) for name in SPEC}
    committed = {}
    for t, clients in enumerate([[0, 1], [2], [3, 5], [1, 4]]):
        _append(w, t, {"loss": float(t)})
        rows = _rows(clients, t)
        for name in SPEC:
            truth[name][clients] = rows[name]
        w.checkpoint(t, {"w": np.full(3, t, dtype=np.float32)}, clients, rows)
        if t in (1, 3):
            w.snapshot(t, {"shared": np.full(3, t, dtype=np.float32)})
        if t < 3:
            w.commit(t)
            committed = {k: v.copy() for k, v in truth.items()}
    w.f.flush()
    w.f.close()  # killed: no close(status)
    return committed


def test_reopen_truncates_uncommitted_rows(path):
    _three_rounds_then_crash(path)
    with h5py.File(path, "r") as f:  # the crash left rows beyond the committed ones
        assert f["rounds/loss"].shape[0] >= 4
        assert f["global/state/round"].shape[0] == 2
    w, done = RunWriter.reopen(path)
    assert done == 3
    f = w.f
    for group in ("rounds", "clients", "comm", "ranks"):
        for name, ds in f[group].items():
            if isinstance(ds, h5py.Dataset):
                assert ds.shape[0] == 3, f"{group}/{name}"
    np.testing.assert_array_equal(f["rounds/loss"][...], [0.0, 1.0, 2.0])
    # the snapshot of the uncommitted round 3 is dropped, the one of round 1 kept
    for group in ("global/state", "clients/state"):
        for name, ds in f[group].items():
            assert ds.shape[0] == 1, f"{group}/{name}"
    np.testing.assert_array_equal(f["global/state/round"][...], [1])
    assert f.attrs["status"] == "running"
    w.close("running")
    assert read_summary(path).rounds_completed == 3


def test_read_checkpoint_returns_last_committed_round(path):
    committed = _three_rounds_then_crash(path)
    w, done = RunWriter.reopen(path)
    server, tables = w.read_checkpoint(done)
    np.testing.assert_array_equal(server["w"], np.full(3, 2.0))  # round 2, not the crashed round 3
    for name in SPEC:
        np.testing.assert_array_equal(tables[name], committed[name])
    w.close("running")


def test_resume_then_continue_keeps_checkpoint_current(path):
    """After a resume, carry_over + the next checkpoint make the new slot hold the whole state."""
    committed = _three_rounds_then_crash(path)
    w, done = RunWriter.reopen(path)
    w.carry_over(done)  # overwrites what the uncommitted round 3 left in slot 1
    rows = _rows([2], 3)
    w.checkpoint(3, {"w": np.full(3, 3, dtype=np.float32)}, [2], rows)
    w.commit(3)
    w.close("completed")
    expected = {k: v.copy() for k, v in committed.items()}
    for name in SPEC:
        expected[name][[2]] = rows[name]
    round_, server, slot = _slot(path, 1)
    assert round_ == 3
    for name in SPEC:
        np.testing.assert_array_equal(slot[name], expected[name])


def test_read_checkpoint_rejects_a_stale_slot(path):
    w = _create(path)
    w.checkpoint(0, {"w": np.zeros(2, np.float32)}, [], _no_rows())
    w.commit(0)
    w.commit(1)  # a round committed without its checkpoint
    with pytest.raises(RuntimeError, match="expected 1"):
        w.read_checkpoint(2)
    w.close("running")


def test_no_client_state(path):
    w = _create(path, spec={})
    w.checkpoint(0, {"w": np.ones(2, np.float32)}, [0, 1], {})
    w.snapshot(0, {"shared": np.ones(2, np.float32)})
    w.commit(0)
    server, tables = w.read_checkpoint(1)
    assert tables == {}
    np.testing.assert_array_equal(server["w"], np.ones(2))
    w.close("completed")


def test_a_torn_read_of_a_live_file_is_retried_then_reported(path, monkeypatch):
    """rounds_completed says 2 but the rows hold 1 (a reader between two writes of a flush): the reader
    retries and then raises OSError naming the file, never an IndexError."""
    import pfl_mpi.store.reader as reader

    w = _create(path)
    for t in range(2):
        _append(w, t, {"loss": float(t)})
        w.commit(t)
    w.close("running")
    with h5py.File(path, "r+") as f:
        f["rounds/loss"].resize(1, axis=0)
    monkeypatch.setattr(reader, "SNAPSHOT_PAUSE", 0.0)
    with pytest.raises(OSError, match="cannot read a consistent state of the file"):
        read_summary(path)


def test_the_lock_has_one_holder_and_names_it(path):
    import os
    import socket

    from pfl_mpi.store.lock import RunFileBusy, RunLock, holder, lock_path

    path.parent.mkdir(parents=True)
    assert holder(path) is None
    with RunLock(path):
        assert holder(path) == {"host": socket.gethostname(), "pid": os.getpid()}
        with pytest.raises(RunFileBusy, match=f"in use by pid {os.getpid()} on host {socket.gethostname()}"):
            RunLock(path).acquire(patience=0.0)
    assert holder(path) is None and not lock_path(path).exists()
    lock_path(path).write_text('{"host": "gone", "pid": 1}')  # left by a killed holder: taken over
    with RunLock(path):
        assert holder(path)["pid"] == os.getpid()


def test_a_new_file_is_written_under_a_temporary_name_and_a_stale_one_is_replaced(path):
    from pfl_mpi.store.writer import partial_path

    path.parent.mkdir(parents=True)
    partial_path(path).write_bytes(b"left by a killed attempt")
    _create(path).close("completed")
    assert read_summary(path).attrs["status"] == "completed" and not partial_path(path).exists()
