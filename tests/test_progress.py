"""Rank 0's progress: one plain line per round when stdout is not a terminal, a bar when it is."""

from __future__ import annotations

import fcntl
import io
import math
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.runtime import Engine
from pfl_mpi.runtime.progress import Progress, launcher_terminal, round_line
from tests.helpers import tiny_config

LINE = re.compile(
    r"^round +(\d+)/(\d+)  train_loss \d+\.\d{4}(  test_acc (\d\.\d{4}))?(  finetuned_acc \d\.\d{4})?"
    r"  down [\d.]+ (B|kB|MB|GB)  up [\d.]+ (B|kB|MB|GB)  mpi [\d.]+ (B|kB|MB|GB)  \d+\.\d\d s$"
)


def _metrics(t: int, evaluated: bool = True, **extra) -> dict[str, float]:
    m = {
        "round": float(t),
        "train_loss": 1.0 / (t + 1),
        "test_acc": 0.5 + t / 100 if evaluated else math.nan,
        "protocol_bytes_down": 51200.0,
        "protocol_bytes_up": 2.5e6,
        "bytes_down": 25600.0,
        "bytes_up": 0.5e6,
        "bytes_other": 1e5,
        "seconds_wall": 0.125,
    }
    return m | extra


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_round_line_shows_round_accuracy_bytes_and_time():
    line = round_line(30, _metrics(4, finetune_test_acc=0.97))
    assert line == (
        "round  5/30  train_loss 0.2000  test_acc 0.5400  finetuned_acc 0.9700  down 51.2 kB  up 2.5 MB  mpi 625.6 kB  "
        "0.12 s"
    )
    assert "test_acc" not in round_line(30, _metrics(5, evaluated=False))


def test_round_line_shows_the_simulated_clock_when_the_network_is_simulated():
    line = round_line(30, _metrics(4, simulated_round_seconds=4.567, simulated_time=123.456))
    assert line.endswith("  up 2.5 MB  sim 4.57 s (clock 123.5 s)  mpi 625.6 kB  0.12 s")


def test_not_a_terminal_gives_exactly_one_plain_line_per_round():
    out = io.StringIO()
    progress = Progress(6, stream=out)
    assert progress.bar is None
    for t in range(6):
        progress.update(_metrics(t, evaluated=t % 2 == 1))
    progress.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert [int(LINE.match(line).group(1)) for line in lines] == [1, 2, 3, 4, 5, 6]
    assert [LINE.match(line).group(4) is not None for line in lines] == [False, True] * 3


def test_terminal_gets_a_bar_and_no_lines():
    out = _Terminal()
    progress = Progress(3, stream=out)
    assert progress.bar is not None
    for t in range(3):
        progress.update(_metrics(t))
    progress.close()
    text = out.getvalue()
    assert "\r" in text and "3/3" in text and "test_acc 0.5200" in text
    assert not any(LINE.match(line) for line in text.splitlines())


def test_disabled_prints_nothing():
    out = io.StringIO()
    progress = Progress(3, enabled=False, stream=out)
    progress.update(_metrics(0))
    progress.close()
    assert out.getvalue() == ""


def test_a_run_prints_one_line_per_round_when_stdout_is_captured(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "p.h5", rounds=4, eval_every=2, device="cpu")
    assert Engine(cfg, SerialWorld(), show_progress=True).run() == 0
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out
    rounds = [LINE.match(line) for line in out.splitlines()]
    assert all(rounds), out
    assert [(int(m.group(1)), int(m.group(2))) for m in rounds] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [m.group(4) is not None for m in rounds] == [False, True, False, True]


# -- under mpiexec (-n P): rank 0's stdout is a pipe to the launcher ---------------------------------

RUN = [
    sys.executable, "-m", "pfl_mpi", "run", "-n", "2", "--set", "rounds=3", "--set", "clients_per_round=5",
    "--set", "data.num_clients=10", "--set", "model.hidden=[16]",
]  # fmt: skip


def _in_a_terminal(command: list[str], columns: int) -> str:
    """Everything ``command`` writes to a pseudo-terminal of ``columns`` columns."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: its stdin, stdout and stderr are the terminal
        os.execv(command[0], command)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
    out = b""
    while select.select([fd], [], [], 300)[0]:
        try:
            data = os.read(fd, 65536)
        except OSError:  # the terminal closed: every process that held it has exited
            break
        if not data:
            break
        out += data
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return out.decode()


def test_two_ranks_on_a_terminal_draw_one_bar_of_its_width(tmp_path):
    text = _in_a_terminal([*RUN, "--out", str(tmp_path / "t.h5")], columns=100)
    frames = [frame for line in text.split("\r\n") for frame in line.split("\r") if frame]
    bars = [frame for frame in frames if "round/s" in frame or "?round/s" in frame]
    assert bars and bars[-1].startswith("100%|") and "| 3/3 [" in bars[-1]
    assert all(len(bar) <= 100 for bar in bars), bars  # sized to the launcher's terminal
    assert "train_loss" in bars[-1] and "test_acc" in bars[-1]
    assert not any(LINE.match(frame) for frame in frames)  # no plain round lines beside the bar
    assert "round 3/3" not in text  # the round is the bar's own count, not repeated in its text
    assert text.count("done: 3 rounds") == 1


def test_two_ranks_into_a_pipe_print_plain_lines(tmp_path):
    done = subprocess.run([*RUN, "--out", str(tmp_path / "p.h5")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout and "\x1b" not in done.stdout
    rounds = [LINE.match(line) for line in done.stdout.splitlines() if line.startswith("round")]
    assert [int(m.group(1)) for m in rounds] == [1, 2, 3]


def test_no_launcher_above_this_process():
    assert launcher_terminal() is None
