"""TensorBoard event files of a run file (committed rounds), written with the ``tensorboard`` package's writer.

Scalars, step = the 1-based round: every ``/rounds`` metric, tagged by kind (``accuracy/``, ``loss/``,
``bytes/`` for ``bytes_*`` and ``protocol_bytes_*``, ``seconds/``, ``rounds/`` for the rest), NaN
(no evaluation that round) left out; per message label, the bytes as /rounds counts them
(``comm_bytes/<label>``) and rank 0's seconds (``comm_seconds/<label>``). Histograms: every float
``/clients`` metric over the clients that have a value that round (``clients/<metric>``). Event times
are the run's own: its creation time plus the rounds' wall seconds. No torch, no TensorFlow.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from .load import Run, bytes_by_label, load_run, server_seconds_by_label

HISTOGRAM_BINS = 30
EVENT_PREFIX = "events.out.tfevents."


def scalar_tag(name: str) -> str:
    """The TensorBoard tag of a /rounds metric."""
    if name.startswith(("bytes_", "protocol_bytes_")):
        return f"bytes/{name}"
    if name.startswith("seconds_"):
        return f"seconds/{name}"
    if "acc" in name:
        return f"accuracy/{name}"
    if "loss" in name:
        return f"loss/{name}"
    return f"rounds/{name}"


def histogram(values: np.ndarray, bins: int = HISTOGRAM_BINS) -> HistogramProto:
    """A TensorBoard histogram of ``values`` (finite, at least one): bucket_limit are right edges."""
    x = values.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    counts, edges = np.histogram(x, bins=bins, range=(lo, hi) if hi > lo else (lo - 0.5, hi + 0.5))
    return HistogramProto(
        min=lo,
        max=hi,
        num=float(len(x)),
        sum=float(x.sum()),
        sum_squares=float((x * x).sum()),
        bucket_limit=[float(e) for e in edges[1:]],
        bucket=[float(c) for c in counts],
    )


def _wall_times(run: Run) -> np.ndarray:
    """Seconds since the epoch at the end of each round: creation time + cumulative round wall time."""
    try:
        start = time.mktime(time.strptime(str(run.attrs["created"]), "%Y-%m-%dT%H:%M:%S"))
    except (KeyError, ValueError):
        start = time.time()
    wall = np.nan_to_num(run.rounds.get("seconds_wall", np.zeros(run.rounds_completed)).astype(np.float64))
    return start + np.cumsum(wall)


def _events(run: Run):
    """(step, wall time, Summary.Value list) per committed round."""
    labels = run.comm_labels if run.comm else []
    moved = bytes_by_label(run) if labels else None
    seconds = server_seconds_by_label(run) if labels else None
    clients = {k: v for k, v in run.clients.items() if k != "participated" and np.issubdtype(v.dtype, np.floating)}
    for t, wall in enumerate(_wall_times(run)):
        values = [
            Summary.Value(tag=scalar_tag(name), simple_value=float(series[t]))
            for name, series in sorted(run.rounds.items())
            if name != "round" and np.isfinite(series[t])
        ]
        for j, label in enumerate(labels):
            values.append(Summary.Value(tag=f"comm_bytes/{label}", simple_value=float(moved[t, j])))
            values.append(Summary.Value(tag=f"comm_seconds/{label}", simple_value=float(seconds[t, j])))
        for name, table in sorted(clients.items()):
            row = table[t][np.isfinite(table[t])]
            if len(row):
                values.append(Summary.Value(tag=f"clients/{name}", histo=histogram(row)))
        yield t + 1, float(wall), values


def export_tensorboard(path: str | Path, out_dir: str | Path) -> Path:
    """Write the run ``path`` as one event file into ``out_dir/<run file stem>/`` (replacing an earlier
    export there); return that directory, the one to give ``tensorboard --logdir`` (or its parent)."""
    run = load_run(path)
    logdir = Path(out_dir) / run.path.stem
    logdir.mkdir(parents=True, exist_ok=True)
    for old in logdir.glob(f"{EVENT_PREFIX}*"):
        old.unlink()
    writer = EventFileWriter(str(logdir))
    try:
        for step, wall, values in _events(run):
            writer.add_event(Event(step=step, wall_time=wall, summary=Summary(value=values)))
    finally:
        writer.close()
    return logdir
