"""The script ``pfl-mpi slurm`` writes works when submitted by hand: its log directory exists, the site's
set-up and ``module load`` run before ``set -u``, srun gets --cpus-per-task (SRUN_CPUS_PER_TASK).

First under bash with stub ``srun``/``module``, then submitted with plain ``sbatch`` to a real SLURM
(``.ci/slurm-up.sh``; CI sets PFL_REQUIRE_SLURM=1 so that this fails instead of skipping without one).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import pytest

from pfl_mpi.cli import main

from .test_slurm import ENDED, SETS, _job_states, _slurm_is_up, clean_env

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "default.yaml")
# a module command like Lmod's: it reads a variable that is not set, so it fails under set -u
MODULE = 'module() { local site=$PFL_TEST_UNSET_VARIABLE; echo "module $* (ran without set -u)"; }'
DEADLINE = 240


def _generate(tmp_path: Path, capsys, *options: str) -> tuple[Path, Path]:
    script, logs = tmp_path / "job.sbatch", tmp_path / "new" / "logs"
    args = ["slurm", CONFIG, *SETS, "--runs-dir", str(tmp_path / "runs"), "--logs-dir", str(logs), "-o", str(script)]
    assert main([*args, *options]) == 0, capsys.readouterr().err
    capsys.readouterr()
    return script, logs


def test_generated_script_under_bash(tmp_path, capsys):
    """Without SLURM: the log directory is made with the script; the stub module runs before set -u;
    srun sees SRUN_CPUS_PER_TASK=3 and the ranks OMP_NUM_THREADS=3."""
    script, logs = _generate(tmp_path, capsys, "--cpus-per-task", "3", "--setup", MODULE, "--module", "gcc/12")
    assert logs.is_dir()
    text = script.read_text()
    assert text.index(MODULE) < text.index("module load gcc/12") < text.index("\nset -u\n")
    bin_dir, record = tmp_path / "bin", tmp_path / "srun.txt"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\necho "$SRUN_CPUS_PER_TASK $OMP_NUM_THREADS $*" >> {record}\n')
    (bin_dir / "srun").chmod(0o755)
    env = clean_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_ID="5",
        SLURM_NTASKS="4",
        SLURM_JOB_NODELIST="n1",
    )
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "module load gcc/12 (ran without set -u)" in done.stdout
    (call,) = record.read_text().splitlines()
    assert call.startswith("3 3 --mpi=pmi2 --kill-on-bad-exit=1 -n 4 ") and "--set threads=3" in call


def test_a_log_directory_that_cannot_be_made_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(["slurm", CONFIG, "--logs-dir", str(blocker / "logs"), "-o", str(tmp_path / "j.sbatch")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"pfl-mpi: config error: --logs-dir: cannot create {blocker}/logs: Not a directory"
    )
    assert not (tmp_path / "j.sbatch").exists()


@pytest.fixture
def slurm():
    reason = _slurm_is_up()
    if reason:
        if os.environ.get("PFL_REQUIRE_SLURM") == "1":
            pytest.fail(f"PFL_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)


def test_real_generated_script_submitted_by_hand(slurm, capsys):
    """sbatch of the written script, as a user would: the job completes, its log is in the new directory,
    the module line ran before set -u, and the ranks' step got 2 CPUs per task."""
    base = Path(tempfile.mkdtemp(prefix="pfl-slurm-script-"))  # outside pytest's tmp, which pytest may prune
    try:
        bin_dir = base / "bin"
        bin_dir.mkdir()
        launcher = bin_dir / "probe-srun"  # named *srun: first a one-task step that reports its CPUs, then the ranks
        launcher.write_text(
            "#!/bin/bash\n"
            "srun -n 1 -N 1 bash -c 'scontrol -o show step \"$SLURM_JOB_ID.$SLURM_STEP_ID\"' "
            "| grep -o 'CPUs=[0-9]*' | sed 's/^/probe step /'\n"
            'exec srun "$@"\n'
        )
        launcher.chmod(0o755)
        options = ["--ntasks-per-node", "2", "--cpus-per-task", "2", "--time", "5", "--setup", MODULE]
        options += ["--module", "site/1", "--launcher", f"{launcher} --mpi=pmi2"]
        script, logs = _generate(base, capsys, *options)
        assert logs.is_dir()
        submitted = subprocess.run(
            ["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=clean_env(), cwd=base, timeout=30
        )
        assert submitted.returncode == 0, submitted.stderr
        job = submitted.stdout.strip().split(";")[0]
        start = time.monotonic()
        while not ((states := _job_states(job)) and all(s in ENDED for s in states.values())):
            assert time.monotonic() - start < DEADLINE, f"job {job} did not end: {states}"
            time.sleep(0.5)
        log = (logs / f"default-{job}.out").read_text()
        assert states == {job: "COMPLETED"}, log
        assert "module load site/1 (ran without set -u)" in log
        # a one-task step gets the 2 CPUs of --cpus-per-task; without SRUN_CPUS_PER_TASK srun gives it all 4 here
        assert "probe step CPUs=2" in log, log
        assert "done: 3 rounds" in log
        with h5py.File(base / "runs" / f"default-{job}.h5", "r", locking=False) as f:
            assert f.attrs["status"] == "completed" and f.attrs["world_size"] == 2
            assert re.search(r"^threads: 2$", f.attrs["config"], re.M)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=10) if "job" in locals() else None
        shutil.rmtree(base, ignore_errors=True)


def test_set_grid_makes_a_job_array_of_the_sweep_grid(tmp_path, capsys):
    """The same grid as pfl-mpi sweep: config x grid values x seeds, one array task each."""
    options = ["--set-grid", "algorithm.name=fedavg,ditto", "--seeds", "0", "1", "--venv", "/opt/venv"]
    script, _ = _generate(tmp_path, capsys, *options)
    text = script.read_text()
    assert "#SBATCH --array=0-3" in text
    cases = re.findall(r"^(\d)\) RUN=\((.*)\) NAME=(\S+) ;;$", text, re.M)
    assert [(i, name) for i, _, name in cases] == [
        ("0", "default-fedavg-s0"),
        ("1", "default-fedavg-s1"),
        ("2", "default-ditto-s0"),
        ("3", "default-ditto-s1"),
    ]
    assert cases[3][1].endswith("--set algorithm.name=ditto --set seed=1")


def test_writing_a_script_does_not_import_torch(tmp_path):
    """``slurm -o -`` checks the schema only (fast on a login node); --submit checks everything first."""
    probe = (
        "import sys; from pfl_mpi.cli import main; "
        f"code = main(['slurm', {CONFIG!r}, '--runs-dir', {str(tmp_path)!r}, '-o', '-']); "
        "print(code, 'torch' in sys.modules, file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.stderr.split() == ["0", "False"], done.stderr
    assert "pfl_mpi run" in done.stdout


def test_submit_checks_the_algorithm_section_before_sbatch(tmp_path, capsys):
    args = ["slurm", CONFIG, "--runs-dir", str(tmp_path), "--set", "algorithm.mu=0.1"]
    assert main([*args, "--submit"]) == 2
    assert capsys.readouterr().err.strip() == "pfl-mpi: config error: algorithm.mu: Extra inputs are not permitted"
    assert main([*args, "-o", str(tmp_path / "job.sbatch")]) == 0  # checked when the job starts
