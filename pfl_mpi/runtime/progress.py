"""Per-round progress on rank 0: a bar on a terminal, one plain line per round otherwise (SLURM logs).

The line (``round_line``) is also what ``pfl-mpi watch`` prints for a running job's file. It shows
the round (1-based), the training loss, the validation and test accuracy on evaluation rounds (and after local
fine-tuning on the last round, when on), the protocol bytes down and up, the round's simulated
seconds and the simulated clock (with a simulated network), the MPI bytes of the simulation and the
round's wall time. The bar is drawn on the stream it checked (stdout), so a redirected stdout never receives
bar control characters. Under an MPI launcher (``-n P``, mpiexec) rank 0's stdout is a pipe to the
launcher, which copies it to its own stdout: when that is a terminal, rank 0 draws the bar too,
sized to that terminal (read from /proc on Linux); either a bar or lines, never both.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

# processes that start MPI ranks and forward their output to their own stdout
LAUNCHERS = frozenset(
    {"mpiexec", "mpiexec.hydra", "mpirun", "hydra_pmi_proxy", "orterun", "prterun", "prted", "orted", "srun"}
)
_TERMINALS = ("/dev/pts/", "/dev/tty")


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def launcher_terminal(pid: int | None = None, depth: int = 6) -> str | None:
    """The terminal that the outermost MPI launcher above this process writes its stdout to, or None
    (no launcher above, its stdout is a file or a pipe, or no /proc)."""
    try:
        pid = _parent(os.getpid() if pid is None else pid)
        outermost = None
        for _ in range(depth):
            if pid <= 1 or Path(f"/proc/{pid}/comm").read_text().strip() not in LAUNCHERS:
                break
            outermost, pid = pid, _parent(pid)
        if outermost is None:
            return None
        target = os.readlink(f"/proc/{outermost}/fd/1")
    except (OSError, ValueError, IndexError):
        return None
    return target if target.startswith(_TERMINALS) else None


def _terminal_columns(device: str) -> int | None:
    try:
        fd = os.open(device, os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return None
    try:
        return os.get_terminal_size(fd).columns
    except OSError:
        return None
    finally:
        os.close(fd)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _present(m: dict[str, float], key: str) -> bool:
    return not math.isnan(m.get(key, math.nan))


def round_line(total: int, m: dict[str, float]) -> str:
    """One human line for a round's metrics."""
    parts = [f"round {int(m['round']) + 1:>{len(str(total))}}/{total}", f"train_loss {m['train_loss']:.4f}"]
    for name in ("val_acc", "val_rmse", "test_acc", "test_rmse"):  # data.eval_on; rmse: task regression
        if _present(m, name):
            parts.append(f"{name} {m[name]:.4f}")
    if _present(m, "finetune_test_acc"):
        parts.append(f"finetuned_acc {m['finetune_test_acc']:.4f}")
    if _present(m, "novel_test_acc"):  # data.novel_clients, served after the last round
        parts.append(f"novel_acc {m['novel_test_acc']:.4f}")
    if "protocol_bytes_down" in m:  # what the round's clients downloaded and uploaded (the protocol ledger)
        parts += [f"down {_fmt_bytes(m['protocol_bytes_down'])}", f"up {_fmt_bytes(m['protocol_bytes_up'])}"]
    if "simulated_time" in m:  # the simulated network: how long the server waited, and its clock since the start
        parts.append(f"sim {m['simulated_round_seconds']:.2f} s (clock {m['simulated_time']:.1f} s)")
    transport = m["bytes_down"] + m["bytes_up"] + m.get("bytes_other", 0.0)
    parts += [f"mpi {_fmt_bytes(transport)}", f"{m['seconds_wall']:.2f} s"]  # what the simulation moved
    return "  ".join(parts)


class Progress:
    """Shows each completed round on ``stream`` (default: stdout): a bar if it is a terminal, else a line."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream: TextIO | None = None):
        self.total = total
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        self.bar = None
        if not enabled:
            return
        if hasattr(self.stream, "isatty") and self.stream.isatty():
            self.bar = tqdm(total=total, initial=start, unit="round", dynamic_ncols=True, file=self.stream)
        elif self._is_stdout():
            device = launcher_terminal()
            columns = _terminal_columns(device) if device else None
            if columns:  # rank 0 under mpiexec, whose stdout is that terminal: a bar of its width
                self.bar = tqdm(total=total, initial=start, unit="round", ncols=columns, file=self.stream)

    def _is_stdout(self) -> bool:
        try:
            return self.stream.fileno() == 1
        except (AttributeError, OSError, ValueError):
            return False

    def update(self, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = round_line(self.total, metrics)
        if self.bar is not None:
            self.bar.set_postfix_str(line.split("  ", 1)[1], refresh=False)
            self.bar.update(1)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
