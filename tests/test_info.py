"""``pfl-mpi info`` after a resume: one line per segment of the run, with its rounds, ranks and hosts."""

from __future__ import annotations

import json
import socket

import h5py

from pfl_mpi.cli import main

TINY = ["rounds=2", "clients_per_round=5", "eval_every=2", "data.num_clients=10", "model.hidden=[16]"]
SETS = [x for s in TINY for x in ("--set", s)]


def test_info_shows_the_ranks_of_each_segment(tmp_path, capsys):
    out = tmp_path / "x.h5"
    assert main(["run", *SETS, "--out", str(out), "--quiet"]) == 0  # rounds 1-2 on one process
    assert main(["run", "--resume", str(out), "--set", "rounds=4", "-n", "2", "--quiet"]) == 0  # 3-4 on 2 ranks
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    with h5py.File(out, "r") as f:
        created = f.attrs["created"]
        (resume,) = json.loads(f.attrs["resumes"])
        assert f.attrs["rounds_completed"] == 4
    host = socket.gethostname()
    start = lines.index("  2 segments (the run was continued 1 time(s)):")
    assert lines[start + 1 : start + 3] == [
        f"    rounds 1-2: 1 rank(s) on {host} (started {created})",
        f"    rounds 3-4: 2 rank(s) on {host} (resumed {resume['time']})",
    ]


def test_no_segments_without_a_resume(tmp_path, capsys):
    out = tmp_path / "y.h5"
    assert main(["run", *SETS, "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "segments (the run was continued" not in capsys.readouterr().out
