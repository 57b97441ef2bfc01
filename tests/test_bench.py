"""The communication benchmark's analysis (no MPI): fit, interpolation, a round's messages, what a
run file measured, tables, the result file, the plot and the command's refusals."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pfl_mpi.cli import main
from pfl_mpi.comm import FIELDS, LABELS
from pfl_mpi.costmodel import fit_alpha_beta, measured_round, predict_round, round_messages
from pfl_mpi.costmodel.fit import AlphaBeta, Interpolated
from pfl_mpi.costmodel.report import (
    fit_all,
    fit_table,
    interpolated,
    parse_size,
    plot,
    prediction_table,
    read_h5,
    sweep_table,
    write_h5,
)
from pfl_mpi.store.layout import FORMAT

from .helpers import tiny_config

SIZES = np.array([8, 64, 512, 4096, 32768, 262144, 2097152])


def test_fit_recovers_alpha_and_beta():
    t = 5e-6 + SIZES / 2e9
    fit = fit_alpha_beta(SIZES, t)
    assert fit.alpha == pytest.approx(5e-6, rel=1e-6)
    assert fit.bandwidth_gbs == pytest.approx(2.0, rel=1e-6)
    assert fit.alpha_us == pytest.approx(5.0, rel=1e-6)
    assert fit.rel_error < 1e-9 and fit.max_rel_error < 1e-9
    np.testing.assert_allclose(fit.predict(SIZES), t)


def test_fit_weighs_sizes_by_relative_error():
    """A 10% error at every size costs the same: the small sizes still decide the latency."""
    t = (3e-6 + SIZES / 1e9) * np.where(np.arange(len(SIZES)) % 2, 1.1, 0.9)
    fit = fit_alpha_beta(SIZES, t)
    assert 2e-6 < fit.alpha < 4e-6
    assert 0.8 < fit.bandwidth_gbs < 1.25
    assert 0.05 < fit.rel_error < 0.15


def test_fit_never_gives_a_negative_latency_or_bandwidth():
    fit = fit_alpha_beta(SIZES, SIZES / 1e9 - 1e-7 * (SIZES < 100))  # would give alpha < 0
    assert fit.alpha >= 0 and fit.beta > 0
    flat = fit_alpha_beta(SIZES, 1e-5 - SIZES * 1e-13)  # would give beta < 0
    assert flat.beta == 0.0 and flat.alpha == pytest.approx(1e-5, rel=0.01)
    assert flat.bandwidth_gbs == float("inf")
    with pytest.raises(ValueError):
        fit_alpha_beta(SIZES, np.zeros(len(SIZES)))


def test_interpolation_passes_through_the_points_and_is_flat_beyond():
    t = 2e-6 + SIZES / 1e9
    f = Interpolated(SIZES, t)
    np.testing.assert_allclose(f.predict(SIZES), t)
    assert f.predict(1) == pytest.approx(t[0])
    assert f.predict(1e12) == pytest.approx(t[-1])
    assert t[2] < f.predict(2000) < t[3]


@pytest.mark.parametrize(("text", "value"), [("8", 8), ("64K", 65536), ("16M", 1 << 24), ("1GB", 1 << 30)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_refuses_nonsense():
    for text in ("0", "-4K", "lots"):
        with pytest.raises(ValueError):
            parse_size(text)


def test_round_messages_follow_the_algorithm_declarations(tmp_path):
    from pfl_mpi.comm.serial import SerialWorld
    from pfl_mpi.runtime import Engine

    for algorithm, ops in (("fedavg", ("Bcast", "Reduce")), ("fedper", ("Bcast", "Reduce"))):
        cfg = tiny_config(tmp_path / f"{algorithm}.h5", algorithm)
        engine = Engine(cfg, SerialWorld(), show_progress=False)
        messages = round_messages(cfg, world_size=3)
        by_label = {m.label: m for m in messages}
        assert (by_label["down"].op, by_label["up"].op) == ops
        assert by_label["down"].nbytes == 4 * engine.algo.down_numel()
        assert by_label["up"].nbytes == 4 * (engine.algo.up_numel() + 1)
        assert by_label["control"].nbytes == 16
        # 6 clients sampled over 2 workers: 3 rows of (client, weight, samples, train_loss) float64 each
        assert by_label["metrics"].nbytes == pytest.approx(3 * 8 * 4)
        assert ("state" in by_label) == (algorithm == "fedper")
        assert [m.label for m in messages if m.label == "ledger"] == ["ledger", "ledger"]
    with pytest.raises(ValueError):
        round_messages(cfg, world_size=1)


def test_round_messages_of_a_per_client_algorithm(tmp_path):
    cfg = tiny_config(tmp_path / "hn.h5", "pfedhn", **{"model.name": "cnn2d"})
    by_label = {m.label: m for m in round_messages(cfg, world_size=4)}
    assert (by_label["down"].op, by_label["up"].op) == ("Scatterv", "Gatherv")
    assert by_label["down"].nbytes == by_label["up"].nbytes > 0  # theta down, theta - theta~ up, 2 clients each


def test_predict_round_sums_calls_per_label():
    from pfl_mpi.costmodel import Message

    fits = {"Bcast": AlphaBeta(1e-6, 1e-9, 0, 0), "Reduce": AlphaBeta(2e-6, 2e-9, 0, 0)}
    messages = [Message("control", "Bcast", 16), Message("up", "Reduce", 1000), Message("up", "Reduce", 16)]
    out = predict_round(messages, fits)
    assert out["control"]["seconds"] == pytest.approx(1e-6 + 16e-9)
    assert out["up"]["seconds"] == pytest.approx(4e-6 + 1016 * 2e-9)
    assert out["up"]["bytes"] == 1016


def _fake_run(path, rounds=5, ranks=3):
    """A run file's /comm: rank 0 waits 0.1 s in every metrics gather; the last round evaluates."""
    shape = (rounds, ranks, len(LABELS))
    comm = {field: np.zeros(shape) for field in FIELDS}
    for label, seconds in (("control", 0.001), ("down", 0.002), ("metrics", 0.101), ("up", 0.003), ("ledger", 0.001)):
        i = LABELS.index(label)
        comm["calls"][:, :, i] = 1
        comm["seconds"][:, :, i] = seconds
        comm["bytes_sent"][:, 1:, i] = 100
    comm["waiting"][:, 0, LABELS.index("metrics")] = 0.1
    comm["calls"][-1, :, LABELS.index("eval_down")] = 1
    with h5py.File(path, "w") as f:
        f.attrs.update(format=FORMAT, rounds_completed=rounds, comm_labels='["' + '", "'.join(LABELS) + '"]')
        for field, values in comm.items():
            f[f"comm/{field}"] = values


def test_measured_round_takes_the_slowest_rank_without_its_waiting(tmp_path):
    _fake_run(tmp_path / "run.h5")
    measured, rounds, size = measured_round(tmp_path / "run.h5")
    assert rounds == [1, 2, 3] and size == 3  # round 0 and the evaluated last round are left out
    assert measured["metrics"]["seconds_raw"] == pytest.approx(0.101)
    assert measured["metrics"]["seconds"] == pytest.approx(0.101)  # the workers did not wait: their 0.101
    assert measured["metrics"]["waiting"] == pytest.approx(0.1)
    assert measured["down"]["bytes"] == 100
    assert measured["metrics"]["calls"] == 1
    assert "state" not in measured
    predicted = {"down": {"bytes": 100, "seconds": 0.002, "interpolated": 0.002, "wake": 0.0005}}
    table = prediction_table("fake", predicted, measured)
    # fit, wake, fit + wake, interp. + wake, measured, raw, waiting
    assert "| down | 100 | 100 | 2.000 | 0.500 | 2.500 | 2.500 | 2.000 | 2.000 | 0.000 |" in table


def test_the_wake_term_follows_how_long_a_call_waited():
    """A call adds the sweep's wake in full after waiting poll_max or longer, in proportion below,
    and nothing within the poll loop's spin (it never slept)."""
    from pfl_mpi.comm.world import SPIN
    from pfl_mpi.costmodel import Message

    fits = {"Gatherv": AlphaBeta(1e-6, 0.0, 0, 0), "Bcast": AlphaBeta(1e-6, 0.0, 0, 0)}
    wake = {"Gatherv": 4e-4, "Bcast": 2e-4}
    messages = [Message("metrics", "Gatherv", 8), Message("down", "Bcast", 8), Message("control", "Bcast", 8)]
    waited = {"metrics": 0.02, "down": 0.5e-3, "control": 0.5 * SPIN}
    out = predict_round(messages, fits, wake=wake, waited=waited, poll_max=1e-3)
    assert out["metrics"]["wake"] == pytest.approx(4e-4)
    assert out["down"]["wake"] == pytest.approx(1e-4)
    assert out["control"]["wake"] == 0.0
    assert out["metrics"]["seconds"] == pytest.approx(1e-6)  # the fit is reported apart
    everywhere = predict_round(messages, fits, wake=wake)  # no run to say who waited: every call wakes
    assert [everywhere[k]["wake"] for k in ("metrics", "down", "control")] == pytest.approx([4e-4, 2e-4, 2e-4])


def test_wake_is_the_notice_time_beyond_the_fit():
    from pfl_mpi.costmodel.report import notice_table, wake_terms

    fits = {"Reduce": AlphaBeta(10e-6, 0.0, 0, 0), "Bcast": AlphaBeta(1e-3, 0.0, 0, 0)}
    notice = {"Reduce": np.array([0.3e-3, 0.5e-3, 0.9e-3]), "Bcast": np.array([0.5e-3, 0.6e-3, 0.7e-3])}
    wake = wake_terms(notice, fits, nbytes=8)
    assert wake["Reduce"] == pytest.approx(0.49e-3)
    assert wake["Bcast"] == 0.0  # never negative: a noticed call cannot be faster than the transfer
    assert "| Reduce | 0.500 | 0.900 | 0.490 |" in notice_table(notice, wake)


def test_measured_round_needs_a_clean_round(tmp_path):
    _fake_run(tmp_path / "short.h5", rounds=2)
    with pytest.raises(ValueError, match="no training round"):
        measured_round(tmp_path / "short.h5")
    _fake_run(tmp_path / "one.h5", ranks=1)
    with pytest.raises(ValueError, match="one rank"):
        measured_round(tmp_path / "one.h5")


def _sweep():
    rng = np.random.default_rng(0)
    ops = ("Bcast", "Reduce", "Gatherv", "pickled_bcast", "pickled_gather", "np.add")
    slow = {"pickled_bcast": 3.0, "pickled_gather": 4.0, "np.add": 0.1}
    return {op: np.outer(slow.get(op, 1.0) * (2e-6 + SIZES / 1e9), 1 + 0.01 * rng.random(3)) for op in ops}


def test_tables_file_and_plot(tmp_path):
    times = _sweep()
    fits = fit_all(SIZES, times)
    table = sweep_table(SIZES, times)
    assert table.splitlines()[0].startswith("| size | Bcast us |")
    assert "Bcast/pickled_bcast" in table and "Gatherv/pickled_gather" in table
    assert len(table.splitlines()) == 2 + len(SIZES)
    assert "| 8 B |" in table and "| 2 MiB |" in table
    first_ratio = float(table.splitlines()[2].split("|")[-4])
    assert first_ratio == pytest.approx(1 / 3, rel=0.05)
    assert "| Bcast | 2.0 | 1.00 |" in fit_table(fits)
    write_h5(tmp_path / "b.h5", SIZES, times, fits, {"ranks": 3, "hosts": ["a", "b", "c"]}, [{"name": "x"}])
    sizes, back, attrs = read_h5(tmp_path / "b.h5")
    np.testing.assert_array_equal(sizes, SIZES)
    for op in times:
        np.testing.assert_array_equal(back[op], times[op])
    assert attrs["ranks"] == 3 and "x" in attrs["predictions"]
    with h5py.File(tmp_path / "b.h5") as f:
        assert f["sweep/Bcast/seconds"].shape == (len(SIZES),)
        assert f["sweep/Bcast"].attrs["beta"] == pytest.approx(1e-9, rel=0.05)
    assert set(interpolated(SIZES, times)) == set(times)
    plot(tmp_path / "b.png", SIZES, times, fits, "test")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args",
    [["bench", "comm"], ["bench", "comm", "-n", "2", "--sizes", "0"], ["bench", "comm", "-n", "2", "--rounds", "2"]],
)
def test_bench_comm_refuses_with_exit_2(args, capsys, monkeypatch):
    for name in ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID", "PFL_MPI_FORCE_MPI"):
        monkeypatch.delenv(name, raising=False)
    assert main(args) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_info_summarises_communication_per_label(tmp_path, capsys):
    from pfl_mpi.comm.serial import SerialWorld
    from pfl_mpi.runtime import Engine

    cfg = tiny_config(tmp_path / "run.h5", "fedavg", rounds=2)
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    assert main(["info", str(cfg.output_path)]) == 0
    out = capsys.readouterr().out
    assert "communication: nothing moved (one process)" in out  # the table itself: tests/mpi/test_bench_mpi.py


def test_bench_comm_checks_a_config_before_any_rank_starts(tmp_path, capsys, monkeypatch):
    for name in ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID", "PFL_MPI_FORCE_MPI"):
        monkeypatch.delenv(name, raising=False)
    bad = tmp_path / "bad.yaml"
    shards = "{name: digits, num_clients: 8, partition: shards, classes_per_client: 2}"
    bad.write_text(f"clients_per_round: 4\ndata: {shards}\n")
    assert main(["bench", "comm", "-n", "2", "--config", str(bad)]) == 2
    assert "data.classes_per_client" in capsys.readouterr().err
