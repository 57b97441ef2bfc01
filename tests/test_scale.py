"""Scale: client tables are streamed, never held whole, and 1,000 FedPer clients fit in 4 GiB on 4 ranks."""

from __future__ import annotations

import importlib.util
import sys
import tracemalloc
from pathlib import Path

import h5py
import numpy as np

from pfl_mpi.store import RunWriter
from pfl_mpi.store import writer as writer_module

ROOT = Path(__file__).resolve().parent.parent
N, NUMEL = 2000, 4096  # a 32 MiB table per state name
MIB = 1 << 20


def _init(k: int) -> dict[str, np.ndarray]:
    return {"head": np.full(NUMEL, k, dtype=np.float32)}


def _expected_rows(start: int, stop: int) -> np.ndarray:
    return np.repeat(np.arange(start, stop, dtype=np.float32)[:, None], NUMEL, axis=1)


def _peak_mib(action) -> float:
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1] / MIB
    finally:
        tracemalloc.stop()


def test_client_tables_are_streamed_in_blocks(tmp_path, monkeypatch):
    """create, snapshot and carry_over move [N, numel] tables in blocks: their peak allocation is a few blocks,
    not the 32 MiB table, and what they write is exact."""
    monkeypatch.setattr(writer_module, "_BLOCK_BYTES", 1 * MIB)  # 64 rows of 16 KiB per block
    path = tmp_path / "run.h5"
    table_mib = N * NUMEL * 4 / MIB
    created: list[RunWriter] = []
    peak = _peak_mib(lambda: created.append(RunWriter.create(path, {}, {}, {"head": NUMEL}, _init, N)))
    w = created[0]
    assert peak < table_mib / 8, f"create allocated {peak:.1f} MiB for a {table_mib:.0f} MiB table"

    rows = np.full((3, NUMEL), -1.0, dtype=np.float32)
    w.checkpoint(0, {"w": np.zeros(2, np.float32)}, [5, 1999, 700], {"head": rows})
    w.commit(0)
    peak = _peak_mib(lambda: w.snapshot(0, {"w": np.zeros(2, np.float32)}))
    assert peak < table_mib / 8, f"snapshot allocated {peak:.1f} MiB"
    peak = _peak_mib(lambda: w.carry_over(1))
    assert peak < table_mib / 8, f"carry_over allocated {peak:.1f} MiB"
    w.close("completed")

    expected = _expected_rows(0, N)
    expected[[5, 700, 1999]] = -1.0
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["checkpoint/slot1/clients/head"][...], expected)  # carried over
        np.testing.assert_array_equal(f["clients/state/head"][0], expected)  # snapshot of round 0


def test_block_rows_bounds_the_block_in_bytes():
    assert writer_module.block_rows(1) == writer_module._BLOCK_BYTES // 4
    assert writer_module.block_rows(10**9) == 1  # a state larger than a block still moves one row at a time
    numel = 68634
    assert writer_module.block_rows(numel) * numel * 4 <= writer_module._BLOCK_BYTES


def _scale_benchmark():
    spec = importlib.util.spec_from_file_location("scale_benchmark", ROOT / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_1000_fedper_clients_on_4_ranks_fit_in_4_gib(tmp_path):
    """The issue's target, measured: peak RSS summed over the 4 ranks below 4 GiB with 1,000 FedPer clients,
    and the server's peak does not grow with N (a 1,000 x 267 KiB head table would add 261 MiB)."""
    scale = _scale_benchmark()
    small = scale.measure(10, 10, rounds=3, ranks=4, work=tmp_path)
    big = scale.measure(1000, 10, rounds=3, ranks=4, work=tmp_path)
    with h5py.File(tmp_path / "n1000-s10" / "run.h5") as f:
        heads = f["clients/state/personal"]
        assert heads.shape[1] == 1000
        state_mib = heads.shape[1] * heads.shape[2] * 4 / MIB
    assert state_mib > 200
    assert big.total_peak < 4 * 1024 * MIB, f"peak RSS per rank {[p // MIB for p in big.peak_bytes]} MiB"
    growth = (big.peak_bytes[0] - small.peak_bytes[0]) / MIB
    assert growth < state_mib / 4, f"the server grew by {growth:.0f} MiB from N = 10 to 1,000"


def test_benchmark_rejects_too_few_rounds(capsys):
    assert _scale_benchmark().main(["--rounds", "2"]) == 2
    assert "--rounds must be at least 3" in capsys.readouterr().err
