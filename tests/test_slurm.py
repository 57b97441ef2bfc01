"""SLURM: the launch check, requeue, job attributes, ``pfl-mpi slurm`` and the jobs/ scripts.

The first part needs no SLURM: environment parsing, runs in this process under simulated SLURM
variables, and the batch scripts executed by bash with a stub ``srun``/``sbatch`` that records
its arguments. The second part submits the jobs/ scripts and a ``pfl-mpi slurm`` script to a real
SLURM (``.ci/slurm-up.sh`` starts a one-node cluster; CI does, and sets PFL_REQUIRE_SLURM=1 so
that these tests fail instead of skipping when the cluster is missing).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest

from pfl_mpi.cli import main
from pfl_mpi.runtime import cluster
from pfl_mpi.runtime.device import select_device

from .helpers import committed

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
CONFIGS = ROOT / "configs"
VENV = Path(sys.prefix)
TINY = [
    "rounds=3",
    "clients_per_round=5",
    "eval_every=3",
    "data.num_clients=10",
    "model.hidden=[16]",
    "train.batch_size=8",
]
SETS = [x for s in TINY for x in ("--set", s)]
_LAUNCH_VARIABLES = ("PMI_", "PMIX_", "OMPI_", "PRTE_", "HYDRA_", "MPI_", "SLURM_", "PFL_")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without launcher, SLURM or PFL_ variables (SLURM_CONF kept), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCH_VARIABLES) or k == "SLURM_CONF"}
    return {**env, **extra}


@pytest.fixture
def no_launcher(monkeypatch):
    """This process as if started by hand: no launcher or SLURM variables."""
    for name in list(os.environ):
        if name.startswith(_LAUNCH_VARIABLES) and name != "SLURM_CONF":
            monkeypatch.delenv(name)
    return monkeypatch


# -- the environment ----------------------------------------------------------------------------


def test_srun_without_pmi_is_a_mismatch_and_says_how_to_fix_it():
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2"}
    message = cluster.launch_mismatch(1, env)
    assert message.startswith("MPI sees 1 rank(s) but 4 were started (SLURM_STEP_NUM_TASKS=4)")
    assert "srun --mpi=pmi2" in message
    assert cluster.launch_mismatch(4, env) is None


def test_mpiexec_inside_a_job_is_checked_against_its_own_size():
    # Measured: ranks of the venv's mpiexec in a job see the proxy's step (1 task) and PMI_SIZE.
    hydra = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "PMI_SIZE": "3", "PMI_RANK": "2"}
    assert cluster.launch_mismatch(3, hydra) is None
    assert "do not match" in cluster.launch_mismatch(1, hydra)
    assert cluster.launch_mismatch(2, {"OMPI_COMM_WORLD_SIZE": "2", "PMI_SIZE": "5"}) is None


def test_no_launcher_and_the_batch_script_itself_are_not_checked():
    assert cluster.launch_mismatch(1, {}) is None
    # the batch script has the allocation's SLURM_NTASKS but is no task of a step: it may start mpiexec
    assert cluster.launch_mismatch(1, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) is None


def test_launcher_rank_prefers_the_mpi_launcher_over_srun():
    assert cluster.launcher_rank({"SLURM_PROCID": "3"}) == 3
    assert cluster.launcher_rank({"PMI_RANK": "1", "SLURM_PROCID": "0"}) == 1
    assert cluster.launcher_rank({}) == 0


def test_requeue_is_read_from_the_restart_count():
    assert cluster.restart_count({"SLURM_RESTART_COUNT": "2"}) == 2 and cluster.requeued({"SLURM_RESTART_COUNT": "2"})
    assert cluster.restart_count({}) == 0 and not cluster.requeued({"SLURM_RESTART_COUNT": "0"})


def test_job_attributes_of_an_array_task():
    env = {
        "SLURM_JOB_ID": "120",
        "SLURM_JOB_NAME": "sweep",
        "SLURM_ARRAY_JOB_ID": "118",
        "SLURM_ARRAY_TASK_ID": "2",
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_JOB_PARTITION": "gpu",
        "SLURM_CLUSTER_NAME": "big",
    }
    assert cluster.slurm_attributes(env) == {
        "slurm_job_id": 120,
        "slurm_job_name": "sweep",
        "slurm_array_job_id": 118,
        "slurm_array_task_id": 2,
        "slurm_nodelist": "gpu[01-02]",
        "slurm_partition": "gpu",
        "slurm_cluster": "big",
        "slurm_restart_count": 0,
    }
    assert cluster.slurm_attributes({"SLURM_RESTART_COUNT": "1"}) == {}  # not in a job


@pytest.mark.parametrize("nodes", [1, 2, 3, 5])
@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_cyclic_layout_binds_every_worker_of_a_node_to_its_own_gpu(monkeypatch, nodes, gpus):
    """The GPU job's layout: nodes x gpus + 1 ranks placed cyclically (rank r on node r % nodes, in rank
    order), each worker on cuda:(node-local rank mod gpus). No two workers of a node share a GPU."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: gpus)
    used: dict[int, list[int]] = {}
    for rank in range(1, nodes * gpus + 1):  # rank 0, the server, takes no GPU
        device = select_device("auto", local_rank=rank // nodes)
        used.setdefault(rank % nodes, []).append(device.index)
    assert all(sorted(indices) == list(range(gpus)) for indices in used.values()), used


# -- the size check and requeue, in this process --------------------------------------------------


def test_run_under_srun_without_pmi_fails_with_one_line(tmp_path, no_launcher, capsys):
    out = tmp_path / "x.h5"
    for name, value in {"SLURM_JOB_ID": "9", "SLURM_STEP_NUM_TASKS": "3", "SLURM_PROCID": "0"}.items():
        no_launcher.setenv(name, value)
    assert main(["run", *SETS, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("pfl-mpi: launch error: MPI sees 1 rank(s) but 3 were started")
    assert not out.exists()
    no_launcher.setenv("SLURM_PROCID", "1")  # the other singletons fail as quietly (after a grace for task 0)
    no_launcher.setattr("pfl_mpi.commands.run.LAUNCH_ERROR_GRACE", 0.0)
    assert main(["run", *SETS, "--out", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err == ""


def _slurm_env(monkeypatch, restarts: int) -> None:
    for name, value in {"SLURM_JOB_ID": "41", "SLURM_JOB_NAME": "t", "SLURM_RESTART_COUNT": str(restarts)}.items():
        monkeypatch.setenv(name, value)


def test_a_requeued_job_continues_its_file(tmp_path, no_launcher, capsys):
    """The first attempt stops after 2 rounds (as if killed); the requeued job, same command, rounds=4,
    continues the file: its 4 rounds equal an unbroken 4-round run, and the file says it resumed."""
    out, full = tmp_path / "job.h5", tmp_path / "full.h5"
    _slurm_env(no_launcher, 0)
    assert main(["run", *SETS, "--set", "rounds=2", "--out", str(out), "--quiet"]) == 0
    before = committed(out, "rounds", "train_loss")
    _slurm_env(no_launcher, 1)
    assert main(["run", *SETS, "--set", "rounds=4", "--out", str(out), "--quiet"]) == 0
    assert f"pfl-mpi: continuing {out} after 2 completed round(s) (SLURM job 41, restart 1)" in capsys.readouterr().out
    for name in ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_RESTART_COUNT"):
        no_launcher.delenv(name)
    assert main(["run", *SETS, "--set", "rounds=4", "--out", str(full), "--quiet"]) == 0

    resumed = committed(out, "rounds", "train_loss")
    np.testing.assert_array_equal(resumed[:2], before)
    np.testing.assert_allclose(resumed, committed(full, "rounds", "train_loss"), rtol=1e-6)
    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "completed" and f.attrs["rounds_completed"] == 4
        assert (f.attrs["slurm_job_id"], f.attrs["slurm_restart_count"]) == (41, 0)  # as created
        (entry,) = json.loads(f.attrs["resumes"])
        assert (entry["rounds_completed"], entry["slurm_restart_count"], entry["world_size"]) == (2, 1, 1)
        assert json.loads(f.attrs["gpus"]) == []
    with h5py.File(full, "r") as f:
        assert "slurm_job_id" not in f.attrs and "resumes" not in f.attrs


def test_resume_if_exists_starts_when_there_is_no_file_and_refuses_another_experiment(tmp_path, no_launcher, capsys):
    out = tmp_path / "x.h5"
    assert main(["run", *SETS, "--set", "rounds=2", "--out", str(out), "--resume-if-exists", "--quiet"]) == 0
    assert "continuing" not in capsys.readouterr().out and committed(out, "rounds", "round").tolist() == [0, 1]
    code = main(["run", *SETS, "--set", "train.lr=0.5", "--out", str(out), "--resume-if-exists", "--quiet"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"pfl-mpi: config error: output: {out} holds another experiment (train.lr differs): cannot continue it"
    )
    assert main(["run", *SETS, "--set", "rounds=2", "--out", str(out), "--resume-if-exists", "--quiet"]) == 0
    assert f"done: {out} already had its 2 rounds" in capsys.readouterr().out


# -- pfl-mpi slurm: the script it writes ----------------------------------------------------------


def write_script(tmp_path: Path, capsys, *options: str) -> str:
    script = tmp_path / "job.sbatch"
    code = main(["slurm", *options, "--runs-dir", str(tmp_path / "runs"), "--script", str(script)])
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == f"wrote {script}"
    return script.read_text()


def directives(text: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]


def test_slurm_directives_follow_the_options(tmp_path, capsys):
    options = ["--nodes", "2", "--ntasks-per-node", "8", "--time", "2-00:00:00", "--partition", "cpu"]
    text = write_script(tmp_path, capsys, str(CONFIGS / "default.yaml"), *options, "--account", "proj7")
    assert text.startswith("#!/bin/bash\n")
    assert directives(text) == [
        "--job-name=default",
        "--nodes=2",
        "--ntasks-per-node=8",
        "--cpus-per-task=1",
        "--time=2-00:00:00",
        "--partition=cpu",
        "--account=proj7",
        f"--output={tmp_path}/runs/logs/%x-%j.out",
        "--requeue",
        "--open-mode=append",
    ]


def test_slurm_gpu_job_has_a_slot_for_the_server(tmp_path, capsys):
    text = write_script(tmp_path, capsys, str(CONFIGS / "default.yaml"), "--gpus-per-node", "4", "--no-requeue")
    assert directives(text)[:4] == ["--job-name=default", "--nodes=1", "--gpus-per-node=4", "--ntasks-per-node=5"]
    assert "--requeue" not in text


def test_slurm_sweep_is_a_job_array(tmp_path, capsys):
    configs = [str(CONFIGS / "default.yaml"), str(CONFIGS / "ditto.yaml")]
    text = write_script(tmp_path, capsys, *configs, "--seeds", "0", "1", "2", "--array", "0-5%2")
    assert "--array=0-5%2" in directives(text)
    assert f"--output={tmp_path}/runs/logs/%x-%A_%a.out" in directives(text)
    assert "--job-name=pfl-sweep" in directives(text)
    text = write_script(tmp_path, capsys, *configs)
    assert "--array=0-1" in directives(text)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--time", "1h"], "--time: '1h' is not a Slurm time"),
        (["--nodes", "0"], "--nodes: must be at least 1, not 0"),
        (["--array", "0-3"], "--array: this job has one task: give several configs or --seeds to sweep"),
        (["--seeds", "1", "2", "--array", "1-2"], "--array: task 2 does not exist: the sweep has tasks 0-1"),
        (["--seeds", "1", "2", "--array", "x"], "--array: 'x' is not a Slurm array spec"),
        (["--seeds", "1", "2", "--array", "0-1:0"], "--array: '0-1:0': a step must be at least 1"),
        (["--gpus-per-node", "2", "--ntasks-per-node", "3"], "--ntasks-per-node: GPU jobs have one rank per GPU"),
        (["--set", "train.lr=-1"], "train.lr"),
        (["--script", "-", "--submit"], "--script: - writes to stdout"),
    ],
)
def test_slurm_refuses_bad_options_with_one_line(tmp_path, capsys, options, message):
    assert main(["slurm", str(CONFIGS / "default.yaml"), *options, "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pfl-mpi: config error: {message}"), err
    assert not (tmp_path / "jobs").exists()


# -- the scripts under bash, with a stub srun -----------------------------------------------------


@dataclass
class Stubbed:
    """A batch script run by bash with ``srun`` (and ``sbatch``) replaced by a stub logging its arguments."""

    code: int
    stdout: str
    stderr: str
    calls: list[list[str]] = field(default_factory=list)


def run_with_stub_srun(tmp_path: Path, script: Path, *args: str, **env: str) -> Stubbed:
    bin_dir, log = tmp_path / "stub-bin", tmp_path / "srun-calls"
    bin_dir.mkdir(exist_ok=True)
    log.write_text("")
    stub = f'#!/bin/bash\nprintf "%s\\0" "$@" >> {log}\necho >> {log}\n'
    for name in ("srun", "sbatch"):
        (bin_dir / name).write_text(stub)
        (bin_dir / name).chmod(0o755)
    slurm = {"SLURM_JOB_ID": "79", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1"}
    full_env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **{**slurm, **env})
    done = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=full_env, cwd=tmp_path)
    calls = [line.strip("\0").split("\0") for line in log.read_text().splitlines() if line.strip("\0")]
    return Stubbed(done.returncode, done.stdout, done.stderr, calls)


def test_generated_array_task_runs_its_config_and_seed(tmp_path, capsys):
    configs = [str(CONFIGS / "default.yaml"), str(CONFIGS / "ditto.yaml")]
    write_script(tmp_path, capsys, *configs, "--seeds", "3", "4", "--set", "rounds=2", "--venv", "/opt/venv")
    task = {"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "2"}
    result = run_with_stub_srun(tmp_path, tmp_path / "job.sbatch", **task)
    assert result.code == 0, result.stderr
    (call,) = result.calls
    run = ["/opt/venv/bin/python", "-m", "pfl_mpi", "run", configs[1], "--set", "rounds=2", "--set", "seed=3"]
    out = ["--out", f"{tmp_path}/runs/ditto-s3-77_2.h5", "--resume-if-exists"]
    assert call == ["--mpi=pmi2", "--kill-on-bad-exit=1", "-n", "4", *run, *out]
    result = run_with_stub_srun(tmp_path, tmp_path / "job.sbatch", SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="4")
    assert result.code == 2 and "no task 4: this sweep has tasks 0-3" in result.stderr and not result.calls


def test_generated_gpu_job_starts_one_rank_per_gpu_plus_the_server(tmp_path, capsys):
    write_script(tmp_path, capsys, str(CONFIGS / "default.yaml"), "--gpus-per-node", "4", "--nodes", "3")
    result = run_with_stub_srun(tmp_path, tmp_path / "job.sbatch", SLURM_JOB_NUM_NODES="3", SLURM_GPUS_ON_NODE="4")
    assert result.code == 0, result.stderr
    (call,) = result.calls
    assert call[:7] == ["--mpi=pmi2", "--kill-on-bad-exit=1", "-N", "3", "--distribution=cyclic", "-n", "13"]
    assert call[call.index("run") + 2 :] == [
        "--set",
        "device=cuda",
        "--out",
        f"{tmp_path}/runs/default-79.h5",
        "--resume-if-exists",
    ]


def test_a_requeued_script_takes_a_fresh_step_id(tmp_path, capsys):
    """MPICH names its shared memory after <job>.<step>; a requeued job numbers its steps from 0 again."""
    write_script(tmp_path, capsys, str(CONFIGS / "default.yaml"))
    result = run_with_stub_srun(tmp_path, tmp_path / "job.sbatch", SLURM_RESTART_COUNT="2")
    assert result.code == 0, result.stderr
    assert result.calls[:2] == [["-n", "1", "-N", "1", "true"]] * 2 and len(result.calls) == 3
    assert "job 79 (restart 2)" in result.stdout


def test_submit_calls_sbatch(tmp_path, capsys, monkeypatch):
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch-args"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "$@" > {log}\necho "4242;pfl"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    runs = tmp_path / "runs"
    assert main(["slurm", str(CONFIGS / "default.yaml"), "--runs-dir", str(runs), "--submit"]) == 0
    script = runs / "jobs" / "default.sbatch"
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {script}",
        f"submitted job 4242: log {runs}/logs/default-4242.out",
    ]
    assert log.read_text().split() == ["--parsable", str(script)]
    assert (runs / "logs").is_dir()  # SLURM would not create it


def test_jobs_array_script_picks_config_and_seed_by_task(tmp_path):
    sweep = {"PFL_CONFIGS": "a.yaml b.yaml", "PFL_SEEDS": "5 6", "PFL_MPI_VENV": str(VENV), "SLURM_ARRAY_JOB_ID": "8"}
    result = run_with_stub_srun(tmp_path, JOBS / "array.sbatch", "--set", "rounds=2", SLURM_ARRAY_TASK_ID="3", **sweep)
    assert result.code == 0, result.stderr
    (call,) = result.calls
    run = call[call.index("run") :]
    assert run == ["run", "b.yaml", "--out", "runs/b-s6-8_3.h5", "--resume-if-exists", "--set", "threads=1"] + [
        "--set",
        "rounds=2",
        "--set",
        "seed=6",
    ]
    result = run_with_stub_srun(tmp_path, JOBS / "array.sbatch", SLURM_ARRAY_TASK_ID="4", **sweep)
    assert result.code == 2 and "no task 4: the sweep has 4 (2 configs x 2 seeds)" in result.stderr


def test_jobs_gpu_script_sizes_the_run_from_the_allocation(tmp_path):
    env = {"PFL_MPI_VENV": str(VENV), "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_PER_NODE": "a100:8"}
    result = run_with_stub_srun(tmp_path, JOBS / "gpu.sbatch", "c.yaml", **env)
    assert result.code == 0, result.stderr
    (call,) = result.calls
    assert call[call.index("-n") + 1] == "17" and ["-N", "2", "--distribution=cyclic"] == call[2:5]
    assert "2 node(s) x 8 GPUs + the server = 17 ranks" in result.stdout


def test_jobs_scripts_refuse_a_missing_venv(tmp_path):
    result = run_with_stub_srun(tmp_path, JOBS / "cpu.sbatch", PFL_MPI_VENV=str(tmp_path / "nowhere"))
    assert result.code == 2 and f"no Python at {tmp_path}/nowhere/bin/python" in result.stderr and not result.calls


# -- a real SLURM ---------------------------------------------------------------------------------

# Seconds from the first submission until every job must have ended. About 60-70 s of CPU work on two
# cores when the machine does nothing else; the bound leaves room for a loaded machine.
DEADLINE = 240
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _slurm_is_up() -> str | None:
    """None when sbatch can be used here, else why not."""
    if not shutil.which("sbatch"):
        return "SLURM is not installed here: `.ci/slurm-up.sh` (as root) installs and starts a one-node cluster"
    try:
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 15 s: is slurmctld running? `.ci/slurm-up.sh` starts it"
    if not {"idle", "mixed", "allocated"} & set(sinfo.stdout.split()):
        said = " ".join(sinfo.stdout.split()) or (sinfo.stderr.strip().splitlines() or ["nothing"])[-1]
        return f"no SLURM node is up (sinfo: {said}): `.ci/slurm-up.sh` (as root) starts a one-node cluster"
    return None


def _job_states(job: str) -> dict[str, str]:
    """JobId -> JobState of a job (every task of an array)."""
    shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=10)
    return dict(re.findall(r"JobId=(\d+) .*?JobState=(\S+)", shown.stdout))


def _array_tasks(job: str) -> dict[int, str]:
    """Task id -> job id of every task of array job ``job``."""
    return {int(task): jid for jid, task in re.findall(r"JobId=(\d+) ArrayJobId=\d+ ArrayTaskId=(\d+)", _record(job))}


def _record(job: str) -> str:
    return subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=10).stdout


@dataclass
class Submitted:
    job: str
    workdir: Path
    log: str  # the log file name, %j etc. filled in


@dataclass
class Cluster:
    started: float
    workdir: Path
    jobs: dict[str, Submitted] = field(default_factory=dict)

    def wait(self, name: str) -> dict[str, str]:
        """Wait for job ``name`` to end (bounded by the shared deadline); its tasks' states."""
        job = self.jobs[name]
        while True:
            states = _job_states(job.job)
            if states and all(s in ENDED for s in states.values()):
                return states
            if time.monotonic() - self.started > DEADLINE:
                raise AssertionError(f"job {name} ({job.job}) did not end within {DEADLINE} s: {states}\n{_logs(job)}")
            time.sleep(0.5)


def _logs(job: Submitted) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(job.workdir.glob("*.out")))


def _sbatch(workdir: Path, script: Path, *args: str, options: tuple[str, ...] = (), **env: str) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    full_env = clean_env(PFL_MPI_VENV=str(VENV), **env)
    command = ["sbatch", "--parsable", f"--chdir={workdir}", *options, str(script), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=30)
    assert done.returncode == 0, f"{shlex.join(command)}: {done.stderr}"
    return done.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def slurm():
    """Every real job of this module, submitted at once so that they run side by side. Their files go to
    a directory of their own: pytest removes old basetemp directories, also under another session's feet."""
    reason = _slurm_is_up()
    if reason:
        if os.environ.get("PFL_REQUIRE_SLURM") == "1":
            pytest.fail(f"PFL_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="pfl-slurm-test-"))
    c = Cluster(time.monotonic(), base)
    cfg = str(CONFIGS / "default.yaml")

    def submit(name: str, script: Path, *args: str, log: str, options=(), **env) -> None:
        workdir = base / name
        job = _sbatch(workdir, script, *args, options=options, **env)
        c.jobs[name] = Submitted(job, workdir, log.replace("%j", job))

    try:
        generated = base / "generated"
        generated.mkdir()
        command = [sys.executable, "-m", "pfl_mpi", "slurm", cfg, *SETS, "--ntasks-per-node", "2", "--time", "5"]
        writer = subprocess.Popen(  # validating the config takes a while: write and submit it meanwhile
            [*command, "--submit"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=generated,
            env=clean_env(),
        )
        study = {
            "PFL_RANK_COUNTS": "2 3",
            "PFL_BENCH_SIZES": "8 4K",
            "PFL_BENCH_REPEATS": "2",
            "PFL_STRONG_CONFIG": cfg,
            "PFL_WEAK_CONFIG": str(CONFIGS / "fedavg-synthetic.yaml"),
            "PFL_CLIENTS_PER_WORKER": "4",
        }
        submit("scaling", JOBS / "scaling.sbatch", *SETS, log="pfl-scaling-%j.out", options=("--ntasks=3",), **study)
        # the requeue test waits for round 3 and requeues: give it many short rounds
        long = ["--set", "rounds=40", "--set", "eval_every=20"]
        submit("requeue", JOBS / "cpu.sbatch", cfg, *SETS, *long, log="pfl-cpu-%j.out", options=("--ntasks=2",))
        submit("cpu", JOBS / "cpu.sbatch", cfg, *SETS, log="pfl-cpu-%j.out")
        gpu = ("--nodes=1", "--gpus-per-node=2", "--ntasks-per-node=3", "--cpus-per-task=1")
        submit("gpu", JOBS / "gpu.sbatch", cfg, *SETS, log="pfl-gpu-%j.out", options=gpu, PFL_DEVICE="auto")
        sweep = {"PFL_CONFIGS": f"{cfg} {CONFIGS / 'ditto.yaml'}", "PFL_SEEDS": "0 1"}
        submit("array", JOBS / "array.sbatch", *SETS, log="", options=("--array=1-2", "--ntasks=2"), **sweep)
        singletons = {"PFL_LAUNCHER": "srun --mpi=none"}
        submit(
            "singletons", JOBS / "cpu.sbatch", cfg, *SETS, log="pfl-cpu-%j.out", options=("--ntasks=2",), **singletons
        )
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
        job = re.search(r"submitted job (\d+)", out).group(1)
        c.jobs["generated"] = Submitted(job, generated / "runs" / "logs", f"default-{job}.out")
    except BaseException:
        _cancel(c)
        raise
    yield c
    _cancel(c)


def _cancel(c: Cluster) -> None:
    """Nothing of ours keeps running after the tests, and their files go."""
    for job in c.jobs.values():
        subprocess.run(["scancel", job.job], capture_output=True, timeout=10)
    shutil.rmtree(c.workdir, ignore_errors=True)


def _attrs(path: Path) -> dict:
    with h5py.File(path, "r", locking=False) as f:
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}


def _check_run(path: Path, job: str, ranks: int, rounds: int = 3) -> dict:
    attrs = _attrs(path)
    assert attrs["status"] == "completed" and attrs["rounds_completed"] == rounds
    assert attrs["slurm_job_id"] == int(job) and attrs["world_size"] == ranks
    node = attrs["slurm_nodelist"]
    hosts = json.loads(attrs["hosts"])
    assert len(hosts) == ranks and {h.split(".")[0] for h in hosts} == {node}
    assert json.loads(attrs["gpus"]) == []  # no GPU on this machine, and the file says so
    return attrs


def _mpich_segments(job: str) -> list[Path]:
    """Shared memory MPICH left behind for step <job>.0 (named by the FNV-1a hash of "<job>.0")."""
    h = 2166136261
    for byte in f"{job}.0".encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return [*Path("/dev/shm").glob(f"mpich_shm_{h:x}_*"), *Path("/dev/shm").glob(f"mpich_vci_{h:x}_*")]


def test_real_requeued_job_continues_its_run_file(slurm):
    """scontrol requeue kills the running job (same job id) and queues it again; the cpu script's run
    continues from its file. SLURM delays a requeued job by two minutes: the test starts it at once."""
    job = slurm.jobs["requeue"]
    path = job.workdir / "runs" / f"default-{job.job}.h5"
    while not (path.exists() and _attrs_or_none(path, "rounds_completed", 0) >= 3):
        assert _job_states(job.job).get(job.job) in ("PENDING", "RUNNING"), _logs(job)
        assert time.monotonic() - slurm.started < DEADLINE, f"no 3 rounds in time\n{_logs(job)}"
        time.sleep(0.3)
    subprocess.run(["scontrol", "requeue", job.job], check=True, timeout=10)
    while _job_states(job.job).get(job.job) != "PENDING":
        assert time.monotonic() - slurm.started < DEADLINE, _record(job.job)
        time.sleep(0.3)
    subprocess.run(["scontrol", "update", f"jobid={job.job}", "StartTime=now"], check=True, timeout=10)
    try:
        assert slurm.wait("requeue") == {job.job: "COMPLETED"}, _logs(job)
    finally:
        for segment in _mpich_segments(job.job):  # left by the killed attempt (ours)
            segment.unlink(missing_ok=True)
    attrs = _check_run(path, job.job, ranks=2, rounds=40)
    (entry,) = json.loads(attrs["resumes"])
    assert entry["slurm_job_id"] == int(job.job) and entry["slurm_restart_count"] == 1
    assert 3 <= entry["rounds_completed"] < 40
    np.testing.assert_array_equal(committed(path, "rounds", "round"), np.arange(40))
    log = (job.workdir / job.log).read_text()
    assert f"pfl-mpi: job {job.job} (restart 0)" in log and f"pfl-mpi: job {job.job} (restart 1)" in log
    assert f"continuing runs/default-{job.job}.h5 after {entry['rounds_completed']} completed round(s)" in log


def _attrs_or_none(path: Path, name: str, default):
    try:
        with h5py.File(path, "r", locking=False) as f:
            return f.attrs.get(name, default)
    except OSError:  # being created
        return default


def test_real_cpu_job(slurm):
    job = slurm.jobs["cpu"]
    assert slurm.wait("cpu") == {job.job: "COMPLETED"}, _logs(job)
    attrs = _check_run(job.workdir / "runs" / f"default-{job.job}.h5", job.job, ranks=4)
    assert attrs["slurm_job_name"] == "pfl-cpu" and attrs["slurm_restart_count"] == 0
    assert "done: 3 rounds" in (job.workdir / job.log).read_text()


def test_real_gpu_job_layout(slurm):
    job = slurm.jobs["gpu"]
    assert slurm.wait("gpu") == {job.job: "COMPLETED"}, _logs(job)
    _check_run(job.workdir / "runs" / f"default-{job.job}.h5", job.job, ranks=3)
    assert "1 node(s) x 2 GPUs + the server = 3 ranks" in (job.workdir / job.log).read_text()


def test_real_job_array_sweeps_configs_and_seeds(slurm):
    job = slurm.jobs["array"]
    states = slurm.wait("array")
    assert len(states) == 2 and set(states.values()) == {"COMPLETED"}, _logs(job)
    expected = {1: ("default", 1, "fedper"), 2: ("ditto", 0, "ditto")}
    tasks = _array_tasks(job.job)
    assert sorted(tasks) == [1, 2] and set(tasks.values()) == set(states)
    for task, (name, seed, algorithm) in expected.items():
        path = job.workdir / "runs" / f"{name}-s{seed}-{job.job}_{task}.h5"
        attrs = _check_run(path, tasks[task], ranks=2)
        assert (attrs["slurm_array_job_id"], attrs["slurm_array_task_id"]) == (int(job.job), task)
        assert (attrs["seed"], attrs["algorithm"]) == (seed, algorithm)
        assert f"task {task} of array job {job.job}" in (job.workdir / f"pfl-sweep-{job.job}_{task}.out").read_text()


def test_real_scaling_study(slurm):
    job = slurm.jobs["scaling"]
    assert slurm.wait("scaling") == {job.job: "COMPLETED"}, _logs(job)
    folder = job.workdir / "runs" / f"scaling-{job.job}"
    for ranks in (2, 3):
        with h5py.File(folder / f"bench-P{ranks}.h5", "r") as f:
            assert f.attrs["ranks"] == ranks
        _check_run(folder / f"strong-P{ranks}.h5", job.job, ranks)
        weak = _check_run(folder / f"weak-P{ranks}.h5", job.job, ranks)
        assert weak["num_clients"] == 4 * (ranks - 1)
    log = (job.workdir / job.log).read_text()
    table = log[log.index("scaling, seconds per round") :].splitlines()[1:5]
    assert table[0].startswith("| P | strong s/round | speed-up")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["2", "3"]
    speedups = [float(row.split("|")[3]) for row in table[2:]]
    assert speedups[0] == 1.0 and speedups[1] > 0
    assert (folder / "strong" / "report.md").exists() and (folder / "weak" / "report.md").exists()


def test_real_srun_without_pmi_fails_loudly(slurm):
    job = slurm.jobs["singletons"]
    assert slurm.wait("singletons") == {job.job: "FAILED"}, _logs(job)
    assert "ExitCode=0:0" not in _record(job.job)
    log = (job.workdir / job.log).read_text()
    errors = [line for line in log.splitlines() if line.startswith("pfl-mpi: launch error")]
    assert errors == [
        "pfl-mpi: launch error: MPI sees 1 rank(s) but 2 were started (SLURM_STEP_NUM_TASKS=2); srun gave MPI no "
        "process information: use srun --mpi=pmi2 (or your site MPI's plugin, see srun --mpi=list) or mpiexec"
    ]
    assert not (job.workdir / "runs" / f"default-{job.job}.h5").exists()


def test_real_generated_script_runs(slurm):
    job = slurm.jobs["generated"]
    assert slurm.wait("generated") == {job.job: "COMPLETED"}, _logs(job)
    runs = job.workdir.parent
    attrs = _check_run(runs / f"default-{job.job}.h5", job.job, ranks=2)
    assert attrs["slurm_job_name"] == "default"
    assert "done: 3 rounds" in (job.workdir / job.log).read_text()
