"""Per-round progress on rank 0: a bar on a terminal, one plain line per round otherwise (SLURM logs)."""

from __future__ import annotations

import math
import sys

from tqdm import tqdm


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def round_line(total: int, m: dict[str, float]) -> str:
    """One human line for a round's metrics."""
    parts = [f"round {int(m['round']) + 1:>{len(str(total))}}/{total}", f"train_loss {m['train_loss']:.4f}"]
    if not math.isnan(m.get("test_acc", math.nan)):
        parts.append(f"test_acc {m['test_acc']:.4f}")
    parts += [
        f"down {_fmt_bytes(m['bytes_down'])}",
        f"up {_fmt_bytes(m['bytes_up'])}",
        f"{m['seconds_wall']:.2f} s",
    ]
    return "  ".join(parts)


class Progress:
    """Shows each completed round."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self.total = total
        self.enabled = enabled
        self.bar = (
            tqdm(total=total, initial=start, unit="round", dynamic_ncols=True)
            if (enabled and sys.stdout.isatty())
            else None
        )

    def update(self, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = round_line(self.total, metrics)
        if self.bar is not None:
            self.bar.set_postfix_str(line.split("  ", 1)[1], refresh=False)
            self.bar.update(1)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
