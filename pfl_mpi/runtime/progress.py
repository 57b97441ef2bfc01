"""Per-round progress on rank 0: a bar on a terminal, one plain line per round otherwise (SLURM logs).

The line (``round_line``) is also what ``pfl-mpi watch`` prints for a running job's file. It shows
the round (1-based), the training loss, the test accuracy on evaluation rounds (and after local
fine-tuning on the last round, when on), the algorithm's bytes down and up, and the round's wall
time. The bar is drawn on the stream it checked (stdout), so a redirected stdout never receives
bar control characters.
"""

from __future__ import annotations

import math
import sys
from typing import TextIO

from tqdm import tqdm


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
    if _present(m, "test_acc"):
        parts.append(f"test_acc {m['test_acc']:.4f}")
    if _present(m, "finetune_test_acc"):
        parts.append(f"finetuned_acc {m['finetune_test_acc']:.4f}")
    parts += [
        f"down {_fmt_bytes(m['bytes_down'])}",
        f"up {_fmt_bytes(m['bytes_up'])}",
        f"{m['seconds_wall']:.2f} s",
    ]
    return "  ".join(parts)


class Progress:
    """Shows each completed round on ``stream`` (default: stdout): a bar if it is a terminal, else a line."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream: TextIO | None = None):
        self.total = total
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm(total=total, initial=start, unit="round", dynamic_ncols=True, file=self.stream) if tty else None

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
