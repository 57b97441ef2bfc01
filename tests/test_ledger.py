"""Per-rank message accounting: record, flatten for gathering, unpack, reset."""

from __future__ import annotations

import numpy as np
import pytest

from pfl_mpi.comm import ALGORITHM_LABELS, FIELDS, LABELS, Ledger
from pfl_mpi.comm.ledger import unpack_rows, waiting_of
from pfl_mpi.comm.serial import SerialWorld


def test_labels_and_fields():
    assert set(ALGORITHM_LABELS) <= set(LABELS)
    assert len(set(LABELS)) == len(LABELS)
    assert FIELDS == ("calls", "bytes_sent", "bytes_received", "seconds", "cpu_seconds", "waiting")


def test_new_ledger_is_zero():
    ledger = Ledger()
    assert ledger.table.shape == (len(LABELS), len(FIELDS))
    assert not ledger.table.any()
    assert ledger.seconds() == 0.0


def test_record_accumulates_per_label():
    ledger = Ledger()
    ledger.record("up", 400, 0, 0.25)
    ledger.record("up", 100, 8, 0.5)
    ledger.record("down", 0, 1000, 1.0)
    up = ledger.table[LABELS.index("up")]
    assert up.tolist() == [2.0, 500.0, 8.0, 0.75, 0.0, 0.0]
    down = ledger.table[LABELS.index("down")]
    assert down.tolist() == [1.0, 0.0, 1000.0, 1.0, 0.0, 0.0]
    others = [i for i, label in enumerate(LABELS) if label not in ("up", "down")]
    assert not ledger.table[others].any()
    assert ledger.seconds() == pytest.approx(1.75)


def test_record_unknown_label_fails():
    with pytest.raises(ValueError):
        Ledger().record("gossip", 1, 1, 0.1)


def test_as_row_unpack_rows_round_trip():
    ledgers = []
    rng = np.random.default_rng(0)
    for _ in range(3):
        ledger = Ledger()
        for _ in range(10):
            label = LABELS[int(rng.integers(len(LABELS)))]
            ledger.record(label, int(rng.integers(1000)), int(rng.integers(1000)), float(rng.random()))
        ledgers.append(ledger)
    rows = np.stack([ledger.as_row() for ledger in ledgers])
    assert rows.shape == (3, len(LABELS) * len(FIELDS))
    assert rows.dtype == np.float64
    table = unpack_rows(rows)
    assert table.shape == (3, len(LABELS), len(FIELDS))
    for r, ledger in enumerate(ledgers):
        np.testing.assert_array_equal(table[r], ledger.table)
        assert table[r, :, FIELDS.index("seconds")].sum() == pytest.approx(ledger.seconds())


def test_as_row_is_a_copy():
    ledger = Ledger()
    ledger.record("control", 8, 0, 0.0)
    row = ledger.as_row()
    row[:] = 99.0
    assert ledger.table[LABELS.index("control"), 0] == 1.0
    ledger.record("control", 8, 0, 0.0)
    assert row[0] == 99.0


def test_reset():
    ledger = Ledger()
    ledger.record("metrics", 10, 20, 0.3)
    table = ledger.table
    ledger.reset()
    assert ledger.table is table
    assert not ledger.table.any()
    assert ledger.seconds() == 0.0
    ledger.record("metrics", 1, 2, 0.1)
    assert ledger.table[LABELS.index("metrics")].tolist() == [1.0, 1.0, 2.0, 0.1, 0.0, 0.0]


def test_serial_world_collectives_copy_locally():
    world = SerialWorld()
    assert world.rank == 0 and world.size == 1 and world.workers == [0]
    assert world.is_server and world.is_worker
    send = np.arange(6, dtype=np.float32)
    recv = np.zeros(6, dtype=np.float32)
    world.scatterv(send, [6], recv, "down")
    np.testing.assert_array_equal(recv, send)
    out = np.zeros(6, dtype=np.float32)
    world.gatherv(send * 2, [6], out, "up")
    np.testing.assert_array_equal(out, send * 2)
    rows = world.gather_rows(np.ones(3), "ledger")
    assert rows.shape == (1, 3)
    buf = send.copy()
    world.broadcast(buf, "control")
    world.reduce_sum(buf, "up")
    np.testing.assert_array_equal(buf, send)


def test_ledger_gather_is_carried_into_the_next_round_once():
    """The gather of round t's counters is reported in round t+1 only, never summed across rounds."""
    ledger = Ledger()
    for t in range(4):
        ledger.reset()
        carried = [1.0, 64.0, 0.0, 0.25, 0.125, 0.0] if t else [0.0] * 6
        assert ledger.table[LABELS.index("ledger")].tolist() == carried
        assert ledger.table[LABELS.index("down")].tolist() == [0.0] * 6
        ledger.record("down", 0, 100, 0.5)
        assert unpack_rows(ledger.as_row()[None])[0, LABELS.index("ledger")].tolist() == carried
        ledger.record("ledger", 64, 0, 0.25, 0.125)  # the gather happens after packing


def test_waiting_of_is_time_until_the_last_rank_entered_within_the_call():
    every = np.array([[10.0, 20.0, 30.0], [10.5, 19.0, 30.0], [12.0, 20.0, 29.0]])  # [ranks, calls]
    seconds = np.array([5.0, 0.5, 5.0])
    np.testing.assert_allclose(waiting_of(every, every[0], seconds), [2.0, 0.0, 0.0])
    np.testing.assert_allclose(waiting_of(every, every[1], seconds), [1.5, 0.5, 0.0])  # capped by the call
    np.testing.assert_allclose(waiting_of(every, every[2], seconds), [0.0, 0.0, 1.0])
    assert waiting_of(np.zeros((3, 0)), np.zeros(0), np.zeros(0)).shape == (0,)


class _FakeRanks:
    """A resolver standing for the Allgather: the other ranks entered each call at fixed times."""

    def __init__(self, others: list[list[float]]):
        self.others, self.calls = others, []

    def __call__(self, own: np.ndarray) -> np.ndarray:
        self.calls.append(own.copy())
        n = len(own)
        return np.vstack([own, *(np.asarray(o[:n]) for o in self.others)]) if n else np.zeros((1 + len(self.others), 0))


def test_waiting_is_resolved_when_packed_and_summed_per_label():
    ledger = Ledger()
    ledger.resolve_entries = _FakeRanks([[3.0, 4.0, 10.0]])
    ledger.record("control", 16, 0, 2.5, entered=1.0)  # the other rank entered at 3: waited 2
    ledger.record("down", 0, 40, 0.5, entered=4.5)  # the other was there first
    ledger.record("down", 0, 40, 1.0, entered=9.5)  # waited 0.5
    assert ledger.waiting() == 0.0  # unknown until packed
    table = unpack_rows(ledger.as_row()[None])[0]
    w = FIELDS.index("waiting")
    assert table[LABELS.index("control"), w] == pytest.approx(2.0)
    assert table[LABELS.index("down"), w] == pytest.approx(0.5)
    assert ledger.waiting() == pytest.approx(2.5)
    assert ledger.entries == []


def test_waiting_of_the_ledger_gather_is_carried_with_it():
    ledger = Ledger()
    fake = _FakeRanks([[2.0]])
    ledger.resolve_entries = fake
    ledger.as_row()
    ledger.record("ledger", 64, 0, 1.5, entered=1.0)  # after packing: resolved in the next round
    ledger.reset()
    assert len(ledger.entries) == 1
    row = unpack_rows(ledger.as_row()[None])[0, LABELS.index("ledger")]
    assert row[FIELDS.index("calls")] == 1.0
    assert row[FIELDS.index("waiting")] == pytest.approx(1.0)
    assert [len(c) for c in fake.calls] == [0, 1]


def test_without_a_resolver_waiting_stays_zero():
    ledger = Ledger()
    ledger.record("up", 4, 0, 1.0, entered=0.0)
    assert unpack_rows(ledger.as_row()[None])[0, :, FIELDS.index("waiting")].sum() == 0.0
    assert ledger.entries == []
