"""End to end through the command line and the venv's mpiexec: what a user runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from .helpers import committed, kill_tree

PLUGINS = str(Path(__file__).parent / "plugins")
TINY = [
    "--set",
    "rounds=4",
    "--set",
    "clients_per_round=5",
    "--set",
    "eval_every=2",
    "--set",
    "data.num_clients=10",
    "--set",
    "data.partition=shards",
    "--set",
    "data.classes_per_client=2",
    "--set",
    "model.hidden=[16]",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.lr=0.1",
]


def pfl(*args: str, timeout: float = 120, **popen) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_", "MPI_", "HYDRA"))}
    env["PYTHONPATH"] = os.pathsep.join([PLUGINS, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "pfl_mpi", *args], capture_output=True, text=True, timeout=timeout, env=env, **popen
    )


@pytest.mark.parametrize("algorithm", ["fedavg", "fedper"])
def test_same_final_metrics_on_1_2_3_4_ranks(algorithm, tmp_path):
    results = {}
    for p in (1, 2, 3, 4):
        out = tmp_path / f"p{p}.h5"
        run = pfl("run", "-n", str(p), "--out", str(out), "--quiet", "--set", f"algorithm.name={algorithm}", *TINY)
        assert run.returncode == 0, run.stderr
        with h5py.File(out) as f:
            assert f.attrs["world_size"] == p
        results[p] = {name: committed(out, "rounds", name) for name in ("train_loss", "test_acc", "test_loss")}
    for p in (2, 3, 4):
        for name, values in results[p].items():
            np.testing.assert_allclose(values, results[1][name], rtol=1e-5, atol=1e-6, err_msg=f"{name} on {p} ranks")


def test_printed_rounds_match_the_file(tmp_path):
    out = tmp_path / "run.h5"
    run = pfl("run", "-n", "2", "--out", str(out), *TINY)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("round ")]
    assert len(lines) == 4
    train_loss, test_acc = committed(out, "rounds", "train_loss"), committed(out, "rounds", "test_acc")
    protocol_down = committed(out, "rounds", "protocol_bytes_down")  # the line leads with the protocol's bytes
    for i, line in enumerate(lines):
        assert re.match(rf"round {i + 1}/4 ", line)
        assert float(re.search(r"train_loss (\S+)", line).group(1)) == pytest.approx(train_loss[i], abs=5e-5)
        acc = re.search(r"test_acc (\S+)", line)
        assert (acc is None) == np.isnan(test_acc[i])
        if acc:
            assert float(acc.group(1)) == pytest.approx(test_acc[i], abs=5e-5)
        down = float(re.search(r"down (\S+) kB", line).group(1))
        assert down == pytest.approx(protocol_down[i] / 1000, abs=0.05)
    assert f"wrote {out}" in run.stdout
    assert f"final test accuracy {test_acc[-1]:.4f}" in run.stdout
    totals = {name: committed(out, "rounds", name).sum() for name in ("protocol_bytes_down", "protocol_bytes_up")}
    assert (
        f"protocol bytes (the clients' downloads and uploads): down {totals['protocol_bytes_down']:.3e}, "
        f"up {totals['protocol_bytes_up']:.3e}" in run.stdout
    )
    # the report of this real 2-rank run states the bytes the file holds
    report = pfl("report", str(out), "-o", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "report" / "report.md").read_text()
    bytes_down, bytes_up = committed(out, "rounds", "bytes_down"), committed(out, "rounds", "bytes_up")
    algorithm_bytes = int(round(bytes_down.sum() + bytes_up.sum()))
    assert algorithm_bytes > 0 and f"| {algorithm_bytes} |" in text
    total = int(round(algorithm_bytes + committed(out, "rounds", "bytes_other").sum()))
    assert f"| {total} |" in text
    with h5py.File(out) as f:
        assert f.attrs["status"] == "completed" and f.attrs["rounds_completed"] == 4
        assert f["clients/test_acc"].shape == (4, 10)
        assert f["partition/label_histograms"].shape == (10, 10)
        assert f["comm/bytes_sent"].shape[:2] == (4, 2)


def test_exception_on_one_worker_ends_the_job(tmp_path):
    start = time.monotonic()
    run = pfl(
        "run",
        "-n",
        "3",
        "--out",
        str(tmp_path / "x.h5"),
        "--set",
        "plugins=[faulty_algorithms]",
        "--set",
        "algorithm.name=faulty",
        "--set",
        "algorithm.fail_client=3",
        "--set",
        "rounds=50",
        *TINY[2:],
        timeout=60,
    )
    elapsed = time.monotonic() - start
    assert run.returncode != 0
    assert "injected failure in client 3" in run.stderr
    assert re.search(r"pfl-mpi: rank [12] of 3 failed", run.stderr)
    assert run.stderr.count("Traceback") == 1
    print(f"failed job ended after {elapsed:.1f} s")


def test_nan_stops_the_run_and_keeps_completed_rounds(tmp_path):
    out = tmp_path / "nan.h5"
    run = pfl(
        "run",
        "-n",
        "2",
        "--out",
        str(out),
        "--set",
        "plugins=[faulty_algorithms]",
        "--set",
        "algorithm.name=faulty",
        "--set",
        "algorithm.nan_round=2",
        *TINY,
    )
    assert run.returncode == 3, run.stderr
    assert "round 3: train_loss became NaN or infinite" in run.stderr
    with h5py.File(out) as f:
        assert f.attrs["status"] == "diverged"
        assert f.attrs["rounds_completed"] == 2
    assert np.all(np.isfinite(committed(out, "rounds", "train_loss")))


def _wait_for_rounds(path: Path, rounds: int, proc: subprocess.Popen, limit: float = 90) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with h5py.File(path, "r", locking=False) as f:
                if int(f.attrs["rounds_completed"]) >= rounds:
                    return
        except (OSError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"run did not reach {rounds} rounds (exit {proc.poll()})")


def test_resume_after_kill_gives_the_same_result(tmp_path):
    """Kill a run (SIGKILL, 3 ranks) after a few rounds, resume it on 2 ranks for a few more, and
    compare with an unbroken run of as many rounds. The killed run is planned far longer than it
    lives, so the kill always lands mid-run however fast the machine is."""
    common = ["--quiet", "--set", "algorithm.name=fedper", *TINY[2:]]
    broken = tmp_path / "broken.h5"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pfl_mpi", "run", "-n", "3", "--out", str(broken), *common, "--set", "rounds=1000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    try:
        _wait_for_rounds(broken, 3, proc)
    finally:
        kill_tree(proc.pid)  # kill -9 of every process of the job
        proc.wait()
    with h5py.File(broken, "r", locking=False) as f:
        done = int(f.attrs["rounds_completed"])
        assert f.attrs["status"] == "running" and 3 <= done < 1000
    rounds = done + 4
    resumed = pfl("run", "-n", "2", "--resume", str(broken), "--quiet", "--set", f"rounds={rounds}")
    assert resumed.returncode == 0, resumed.stderr
    full = tmp_path / "full.h5"
    assert pfl("run", "-n", "3", "--out", str(full), *common, "--set", f"rounds={rounds}").returncode == 0
    for name in ("train_loss", "test_acc", "test_loss", "bytes_up"):
        a, b = committed(full, "rounds", name), committed(broken, "rounds", name)
        assert len(a) == len(b) == rounds
        if name == "bytes_up":  # 3 ranks before the kill, 2 after: only the worker count changes the bytes
            a, b = a[:done], b[:done]
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)
    with h5py.File(full) as f, h5py.File(broken) as g:
        assert g.attrs["status"] == "completed"
        np.testing.assert_allclose(g["clients/state/personal"][-1], f["clients/state/personal"][-1], atol=1e-5)
        np.testing.assert_allclose(g["global/state/shared"][-1], f["global/state/shared"][-1], atol=1e-5)
