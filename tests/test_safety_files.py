"""The run file is never lost: an existing file is replaced only on request, a live file has one writer,
a new file appears only once its header is written, a write error (a full disk) never marks a round
committed and the run resumes to exactly the unbroken result, and Ctrl-C commits and says so in one line.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.errors import EXIT_WRITE
from pfl_mpi.runtime import Engine
from pfl_mpi.runtime.cluster import Stopper
from pfl_mpi.store import RunWriter
from pfl_mpi.store.lock import RunLock, lock_path
from pfl_mpi.store.writer import partial_path
from tests.helpers import tiny_config

_MPI = ("PMI_", "PMIX_", "OMPI_", "MPI_", "HYDRA", "PFL_MPI_", "SLURM_")
TINY = ["--set", "data.num_clients=8", "--set", "clients_per_round=4", "--set", "model.name=logreg"]
TINY += ["--set", "train.batch_size=32", "--set", "device=cpu", "--set", "eval_every=5", "--quiet"]
METRICS = ("train_loss", "test_acc", "test_loss")


def _env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith(_MPI)}, "OMP_NUM_THREADS": "1", **extra}


def pfl(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "pfl_mpi", *args], capture_output=True, text=True, cwd=cwd, env=env or _env(),
        timeout=timeout,
    )  # fmt: skip


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _run_engine(path: Path, rounds: int, resume: bool = False) -> int:
    engine = Engine(tiny_config(path, rounds=rounds, device="cpu"), SerialWorld(), resume=resume, show_progress=False)
    Stopper(SerialWorld()).watch(engine)
    return engine.run()


@pytest.fixture(scope="module")
def done_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("files") / "done.h5"
    assert _run_engine(path, rounds=2) == 0
    return path


@pytest.fixture
def copy(done_file, tmp_path) -> Path:
    path = tmp_path / "run.h5"
    shutil.copy(done_file, path)
    return path


def test_an_existing_output_is_refused_without_overwrite(copy):
    before = copy.read_bytes()
    run = pfl("run", "--out", str(copy), *TINY, "--set", "rounds=1")
    assert run.returncode == 2
    assert _lines(run.stderr) == [
        f"pfl-mpi: config error: output: {copy} exists (status completed, 2/2 rounds): "
        f"--overwrite replaces it, --resume {copy} continues it"
    ]
    assert copy.read_bytes() == before


def test_resume_refuses_out_and_fewer_rounds_than_done(copy):
    with_out = pfl("run", "--resume", str(copy), "--out", str(copy.with_name("other.h5")))
    assert with_out.returncode == 2 and len(_lines(with_out.stderr)) == 1
    assert _lines(with_out.stderr)[0].startswith("pfl-mpi: config error: out: --resume continues")
    fewer = pfl("run", "--resume", str(copy), "--set", "rounds=1")
    assert fewer.returncode == 2
    assert _lines(fewer.stderr) == [
        f"pfl-mpi: config error: rounds: 1 is fewer than the 2 rounds {copy} has completed: rounds can only grow"
    ]
    with h5py.File(copy, "r", locking=False) as f:
        assert f.attrs["rounds_planned"] == 2 and f.attrs["rounds_completed"] == 2
    assert not copy.with_name("other.h5").exists()


def test_a_live_file_has_one_writer_and_the_refusal_names_the_holder(copy):
    """While a lock is held (as rank 0 of a running job holds it), a second writer, an overwrite, a resume and
    a --resume-if-exists (whatever its rounds) are refused with one line naming the holder; under mpiexec the refusal comes from rank 0
    and no rank hangs."""
    holder = f"pid {os.getpid()} on host {socket.gethostname()}"
    with RunLock(copy):
        runs = [
            pfl("run", "--resume", str(copy), "--set", "rounds=3"),
            pfl("run", "--out", str(copy), "--overwrite", *TINY),
            pfl("run", "--resume", str(copy), "--set", "rounds=3", "-n", "2"),
            pfl("run", "--out", str(copy), *TINY, "--set", "rounds=1", "--resume-if-exists"),  # not "rounds: 1 <"
        ]
        mpiexec = Path(sys.executable).parent / "mpiexec"
        direct = subprocess.run(
            [str(mpiexec), "-n", "2", sys.executable, "-m", "pfl_mpi", "run", "--resume", str(copy)],
            capture_output=True, text=True, env=_env(), timeout=300,
        )  # fmt: skip
        runs.append(direct)
    for run in runs:
        assert run.returncode == 2, run.stderr
        assert len(_lines(run.stderr)) == 1, run.stderr
        assert f"{copy} is in use by {holder}" in run.stderr
    with h5py.File(copy, "r", locking=False) as f:
        assert f.attrs["rounds_completed"] == 2 and f.attrs["status"] == "completed"
    assert not lock_path(copy).exists()  # the holder removed its side file


def test_a_reader_holding_hdf5_lock_stops_a_resume_but_an_overwrite_never_truncates_its_file(copy):
    with h5py.File(copy, "r") as reader:  # a notebook, with HDF5's own lock
        resume = pfl("run", "--resume", str(copy), "--set", "rounds=3")
        assert resume.returncode == 2
        assert _lines(resume.stderr) == [
            f"pfl-mpi: config error: resume: {copy} is open in another program that holds HDF5's file lock: "
            "close it first"
        ]
        fresh = pfl("run", "--out", str(copy), "--overwrite", *TINY, "--set", "rounds=3")
        assert fresh.returncode == 0, fresh.stderr
        assert reader.attrs["rounds_completed"] == 2 and reader["rounds/train_loss"].shape == (2,)
    with h5py.File(copy, "r", locking=False) as f:
        assert f.attrs["rounds_completed"] == 3 and f.attrs["status"] == "completed"


def test_a_read_only_file_system_is_refused(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)], check=True)
    try:
        run = pfl("run", "--out", str(mount / "sub" / "x.h5"), *TINY)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
    assert run.returncode == 2
    assert _lines(run.stderr) == [
        f"pfl-mpi: config error: output: cannot write in {mount} (read-only file system): choose another --out"
    ]


def test_a_new_file_appears_only_once_its_header_is_written(tmp_path):
    path = tmp_path / "new.h5"
    seen = []

    def init_state(k: int) -> dict[str, np.ndarray]:
        seen.append((path.exists(), partial_path(path).exists()))
        return {"a": np.zeros(2, dtype=np.float32)}

    RunWriter.create(path, {"name": "t"}, {"train_sizes": np.ones(3)}, {"a": 2}, init_state, 3).close("completed")
    assert seen and all(s == (False, True) for s in seen)
    assert path.exists() and not partial_path(path).exists()


def test_a_requeued_job_whose_first_attempt_died_creating_the_file_starts_again(tmp_path):
    """The killed attempt left a half-made ``.partial`` and a stale lock file (its holder is dead); the
    requeued job (SLURM_RESTART_COUNT=1) finds no run file, so it starts the run."""
    out = tmp_path / "job.h5"
    partial_path(out).write_bytes(b"\x89HDF\r\n half made")
    lock_path(out).write_text('{"host": "gone", "pid": 999999}')
    slurm = _env(SLURM_JOB_ID="77", SLURM_RESTART_COUNT="1")
    run = pfl("run", "--out", str(out), *TINY, "--set", "rounds=2", "--resume-if-exists", env=slurm)
    assert run.returncode == 0, run.stderr
    with h5py.File(out, "r", locking=False) as f:
        assert f.attrs["rounds_completed"] == 2 and f.attrs["status"] == "completed"
        assert f.attrs["slurm_restart_count"] == 1
    assert not partial_path(out).exists() and not lock_path(out).exists()


def test_a_failed_flush_never_commits_its_round_and_the_resume_is_exact(tmp_path, monkeypatch):
    """The first flush of round 3's commit fails (ENOSPC): the run stops with EXIT_WRITE, the file says 2
    committed rounds (round 3's rows may be there, uncommitted), and resuming gives the unbroken result."""
    broken, full = tmp_path / "broken.h5", tmp_path / "full.h5"
    real_flush, failed = h5py.File.flush, []

    def flaky(self):
        mine = Path(self.filename) in (broken, partial_path(broken))  # HDF5 keeps the name it created
        committing_round_3 = mine and self.attrs.get("rounds_completed") == 2 and self["rounds/round"][2] == 2
        if committing_round_3 and not failed:  # its first flush: round 3's rows, before rounds_completed = 3
            failed.append(True)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_flush(self)

    monkeypatch.setattr(h5py.File, "flush", flaky)
    engine = Engine(tiny_config(broken, rounds=5, device="cpu"), SerialWorld(), show_progress=False)
    stopper = Stopper(SerialWorld())
    stopper.watch(engine)
    assert engine.run() == EXIT_WRITE
    assert failed and "No space left on device" in str(stopper.failure)
    assert "keeps at least 2 committed round(s)" in str(stopper.failure)
    engine.writer.f.close()  # the process would end here; closing writes the uncommitted rows
    monkeypatch.setattr(h5py.File, "flush", real_flush)
    with h5py.File(broken, "r", locking=False) as f:
        assert f.attrs["rounds_completed"] == 2 and f.attrs["status"] == "running"
    assert _run_engine(broken, rounds=5, resume=True) == 0
    assert _run_engine(full, rounds=5) == 0
    _assert_same_run(broken, full, 5)


def _assert_same_run(a: Path, b: Path, rounds: int) -> None:
    with h5py.File(a, "r", locking=False) as f, h5py.File(b, "r", locking=False) as g:
        assert f.attrs["rounds_completed"] == g.attrs["rounds_completed"] == rounds
        assert f.attrs["status"] == g.attrs["status"] == "completed"
        for name in METRICS:
            np.testing.assert_array_equal(f["rounds"][name][:], g["rounds"][name][:], err_msg=name)
        for name in f["global/state"]:
            np.testing.assert_array_equal(f["global/state"][name][-1], g["global/state"][name][-1], err_msg=name)


def test_a_full_disk_stops_the_job_with_one_line_and_the_resume_is_exact(tmp_path):
    """A 700 KiB tmpfs as the output directory of a 2-rank job: it fills up mid-run. The writer stops at a
    round's start when the disk lacks room for the round (HDF5 meeting ENOSPC inside a flush can leave the
    file unreadable): one line, exit 4, the committed rounds intact. After making room, --resume ends
    exactly as an unbroken run."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)], check=True)
    try:
        out, rounds = mount / "x.h5", 60
        run = pfl("run", "-n", "2", "--out", str(out), *TINY, "--set", f"rounds={rounds}")
        assert run.returncode == EXIT_WRITE, run.stderr
        lines = _lines(run.stderr)
        assert len(lines) == 1 and "No space left on device" in lines[0], run.stderr
        with h5py.File(out, "r", locking=False) as f:
            done = int(f.attrs["rounds_completed"])
            assert f.attrs["status"] == "running" and 0 < done < rounds
        assert lines[0].startswith(f"pfl-mpi: cannot write {out} (round ")
        assert f"the file keeps at least {done} committed round(s)" in lines[0]  # stopped before writing
        subprocess.run(["mount", "-o", "remount,size=20m", str(mount)], check=True)
        resumed = pfl("run", "-n", "2", "--resume", str(out), "--quiet")
        assert resumed.returncode == 0, resumed.stderr
        full = tmp_path / "full.h5"
        assert pfl("run", "-n", "2", "--out", str(full), *TINY, "--set", f"rounds={rounds}").returncode == 0
        _assert_same_run(out, full, rounds)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_ctrl_c_commits_says_one_line_and_the_run_resumes(tmp_path):
    """SIGINT to a one-process run: the round in flight ends, is committed, status interrupted, exit 130."""
    out = tmp_path / "x.h5"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pfl_mpi", "run", "--out", str(out), *TINY, "--set", "rounds=100000"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with h5py.File(out, "r", locking=False) as f:
                if int(f.attrs["rounds_completed"]) >= 2:
                    break
        except (OSError, KeyError):
            pass
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    with h5py.File(out, "r", locking=False) as f:
        done, status = int(f.attrs["rounds_completed"]), f.attrs["status"]
    assert status == "interrupted" and done >= 2
    assert _lines(err) == [
        f"pfl-mpi: stopped by SIGINT: {out} keeps {done} committed round(s), status interrupted; "
        f"continue with: pfl-mpi run --resume {out}"
    ]
    resumed = pfl("run", "--resume", str(out), "--set", f"rounds={done + 1}", "--quiet")
    assert resumed.returncode == 0, resumed.stderr


def test_a_rerun_of_the_same_name_is_refused(done_file, tmp_path):
    """No --out: the file is runs/<name>.h5, and a second run of the config is refused as --out would be."""
    from .test_cli import TINY as CONFIG

    (tmp_path / "tiny.yaml").write_text(CONFIG, encoding="utf-8")
    (tmp_path / "runs").mkdir()
    shutil.copy(done_file, tmp_path / "runs" / "tiny.h5")
    before = (tmp_path / "runs" / "tiny.h5").read_bytes()
    run = pfl("run", "tiny.yaml", "--quiet", cwd=tmp_path)
    assert run.returncode == 2
    assert _lines(run.stderr) == [
        "pfl-mpi: config error: output: runs/tiny.h5 exists (status completed, 2/2 rounds): "
        "--overwrite replaces it, --resume runs/tiny.h5 continues it"
    ]
    assert (tmp_path / "runs" / "tiny.h5").read_bytes() == before


def test_an_overwrite_that_fails_while_creating_its_file_keeps_the_old_one(copy):
    """The new file is made under <out>.partial: a failure before it is complete leaves the old run intact."""
    from pfl_mpi.store.writer import RunFileWriteError

    before = copy.read_bytes()

    def init_state(k: int) -> dict[str, np.ndarray]:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RunFileWriteError, match="No space left on device"):
        RunWriter.create(copy, {"name": "t"}, {"train_sizes": np.ones(3)}, {"a": 2}, init_state, 3)
    assert copy.read_bytes() == before


def test_a_resume_of_a_file_held_open_is_refused_on_every_rank_instead_of_hanging(copy):
    """A reader holds HDF5's lock on the file; ``mpiexec -n 2 ... --resume`` (no launcher validated first):
    rank 0 refuses it in one line, rank 1 hears of it, both exit 2."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    with h5py.File(copy, "r"):
        run = subprocess.run(
            [str(mpiexec), "-n", "2", sys.executable, "-m", "pfl_mpi", "run", "--resume", str(copy), "--set",
             "rounds=3"], capture_output=True, text=True, env=_env(), timeout=300,
        )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert _lines(run.stderr) == [
        f"pfl-mpi: config error: resume: {copy} is open in another program that holds HDF5's file lock: close it first"
    ]


@pytest.mark.parametrize("damage", ["checkpoint", "rows"])
def test_a_resume_checks_what_it_reads_and_refuses_a_damaged_file(copy, damage, tmp_path, monkeypatch, capsys):
    """The latest checkpoint slot does not hold the last committed round, or a committed row is missing:
    --resume refuses the file in one line (exit 2) and leaves it as it was."""
    from pfl_mpi.cli import main
    from pfl_mpi.store.layout import slot_of

    with h5py.File(copy, "r+") as f:
        if damage == "checkpoint":
            f[slot_of(1)].attrs["round"] = 0
        else:
            f["rounds/train_loss"].resize(1, axis=0)
    before = copy.read_bytes()
    for name in [n for n in os.environ if n.startswith(_MPI)]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--resume", str(copy), "--set", "rounds=3"]) == 2
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("pfl-mpi: config error: resume: "), lines
    assert ("does not hold round 2" if damage == "checkpoint" else "rounds/train_loss has 1 rows, 2") in lines[0]
    assert copy.read_bytes() == before


def _until_committed(path: Path, proc: subprocess.Popen, rounds: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with h5py.File(path, "r", locking=False) as f:
                if int(f.attrs["rounds_completed"]) >= rounds:
                    return
        except (OSError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{path}: {rounds} rounds were not committed ({proc.poll()=})")


def test_info_and_watch_read_a_live_file_without_a_traceback(tmp_path):
    """A job commits a round every few milliseconds (evaluating each); info and watch read it meanwhile."""
    out = tmp_path / "live.h5"
    job = subprocess.Popen(
        [sys.executable, "-m", "pfl_mpi", "run", "--out", str(out), *TINY, "--set", "rounds=100000",
         "--set", "eval_every=1"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _until_committed(out, job, 2)
        infos = [pfl("info", str(out)) for _ in range(4)]
        watched = pfl("watch", str(out), "--interval", "0.05", "--timeout", "2")
    finally:
        job.send_signal(signal.SIGTERM)
        job.communicate(timeout=120)
    for info in infos:
        assert info.returncode == 0 and info.stderr == "", info.stderr
        assert info.stdout.splitlines()[1].startswith("  status running, ")
    assert watched.returncode == 124 and "Traceback" not in watched.stderr, watched.stderr
    assert watched.stdout.startswith("round ") and len(watched.stdout.splitlines()) >= 2
    assert job.returncode == 143


def test_ctrl_c_of_a_launched_job_is_one_line(tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the launcher's process group (``pfl-mpi run -n 2``): the launcher
    passes it to mpiexec as SIGTERM (mpiexec would add lines of its own for SIGINT); one line, exit 143."""
    out = tmp_path / "x.h5"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pfl_mpi", "run", "-n", "2", "--out", str(out), *TINY, "--set", "rounds=100000"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    _until_committed(out, proc, 2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    with h5py.File(out, "r", locking=False) as f:
        done, status = int(f.attrs["rounds_completed"]), f.attrs["status"]
    assert status == "interrupted"
    assert _lines(err) == [
        f"pfl-mpi: stopped by SIGTERM: {out} keeps {done} committed round(s), status interrupted; "
        f"continue with: pfl-mpi run --resume {out}"
    ]


def test_two_runs_started_on_the_same_file_at_once_make_one_run(tmp_path):
    """Two jobs given the same --out at the same moment: one writes the file; the other is refused in one line
    (the first one's lock, or its file already in place), exit 2, and the file is the first one's, complete."""
    out = tmp_path / "both.h5"
    command = [sys.executable, "-m", "pfl_mpi", "run", "--out", str(out), *TINY, "--set", "rounds=20"]
    jobs = [subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    jobs.append(subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [(job.wait(timeout=300), job.stderr.read()) for job in jobs]
    assert sorted(code for code, _ in results) == [0, 2], results
    refusal = _lines(next(err for code, err in results if code == 2))
    assert len(refusal) == 1 and refusal[0].startswith(f"pfl-mpi: config error: output: {out} "), refusal
    assert " is in use by pid " in refusal[0] or " exists (status " in refusal[0]
    with h5py.File(out, "r", locking=False) as f:
        assert f.attrs["rounds_completed"] == 20 and f.attrs["status"] == "completed"
    assert not partial_path(out).exists() and not lock_path(out).exists()


FULL_AT = """\
import errno
import os

from pfl_mpi.store.writer import RunWriter

AT = int(os.environ.get("PFL_TEST_FULL_AT", "-1"))
_check_room = RunWriter._check_room


def check_room(self, t, scalars):
    if t == AT:  # the disk is full when round AT + 1 starts writing
        raise OSError(errno.ENOSPC, "No space left on device")
    return _check_room(self, t, scalars)


RunWriter._check_room = check_room
"""


def test_a_full_disk_just_after_a_block_of_rows_leaves_every_committed_row_and_resumes_exactly(tmp_path):
    """The per-round datasets grow 64 rows at a time, and seconds_io is written after its round's commit:
    a run stopped by a full disk at round 66 (a plugin fills the disk) must leave all 65 committed rows of
    every dataset on disk (the process ends without closing the file), and resume to the unbroken result."""
    from pfl_mpi.store.writer import ROUND_BLOCK

    (tmp_path / "full_at.py").write_text(FULL_AT, encoding="utf-8")
    at, rounds = ROUND_BLOCK + 1, ROUND_BLOCK + 3
    broken, unbroken = tmp_path / "broken.h5", tmp_path / "unbroken.h5"
    common = [*TINY, "--set", f"rounds={rounds}", "--set", f"plugins=[{tmp_path / 'full_at.py'}]"]
    run = pfl("run", "--out", str(broken), *common, env=_env(PFL_TEST_FULL_AT=str(at)))
    assert run.returncode == EXIT_WRITE, run.stderr
    assert _lines(run.stderr) == [
        f"pfl-mpi: cannot write {broken} (round {at + 1}): No space left on device; the file keeps at least {at} "
        f"committed round(s): make room, then continue it with pfl-mpi run --resume {broken}"
    ]
    with h5py.File(broken, "r", locking=False) as f:
        assert int(f.attrs["rounds_completed"]) == at and f.attrs["status"] == "running"
        short = {name: ds.shape[0] for name, ds in f["rounds"].items() if ds.shape[0] < at}
    assert short == {}, f"datasets with fewer rows than the {at} committed rounds: {short}"
    resumed = pfl("run", "--resume", str(broken), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert pfl("run", "--out", str(unbroken), *common).returncode == 0
    _assert_same_run(broken, unbroken, rounds)
