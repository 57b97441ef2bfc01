"""What a run file holds: configuration, ranks, progress, final metrics."""

from __future__ import annotations

import argparse
import math
import sys

NAME = "info"
HELP = "what a run file holds: config, ranks, progress, final metrics"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="HDF5 run file")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..report.score_lines import score_lines
    from ..runtime.novel_record import novel_line
    from ..store import read_summary

    try:
        summary = read_summary(args.file)
    except (OSError, ValueError) as err:
        print(f"pfl-mpi: cannot read {args.file}: {err}", file=sys.stderr)
        return 1
    a, r = summary.attrs, summary.rounds
    print(f"{summary.path}: run '{a['name']}', algorithm {a['algorithm']}, seed {a['seed']}")
    print(
        f"  status {a['status']}, {summary.rounds_completed}/{a['rounds_planned']} rounds completed, "
        f"last written {a.get('updated', '-')}"
    )
    hosts = a["hosts"]
    print(f"  {a['world_size']} rank(s) on {len(set(hosts))} host(s): {', '.join(sorted(set(hosts)))}")
    for line in segment_lines(a, summary.rounds_completed):
        print(line)
    print("  versions: " + ", ".join(f"{k} {v}" for k, v in a["versions"].items()))
    if "client_batch_use" in a:  # files written before it was recorded have only client_batch
        print(f"  clients in blocks of {a['client_batch']}: {a['client_batch_use']}")
    if summary.rounds_completed:
        for i in _last_evaluated(r):
            for line in score_lines(
                {k: v[i] for k, v in r.items() if v.ndim == 1}, f"last evaluation (round {i + 1}):"
            ):
                print(line)
        print(f"  last train loss {r['train_loss'][-1]:.4f}")
        if novel_line(r):  # data.novel_clients
            print(novel_line(r))
        if "protocol_bytes_down" in r:
            print(
                f"  protocol bytes (what the clients would send in a deployment): down "
                f"{r['protocol_bytes_down'].sum():.3e}, up {r['protocol_bytes_up'].sum():.3e}, "
                f"evaluation {r['protocol_bytes_eval'].sum():.3e}"
            )
        print(
            f"  transport bytes (this simulation's MPI messages): algorithm down {r['bytes_down'].sum():.3e}, "
            f"up {r['bytes_up'].sum():.3e}; other messages {r['bytes_other'].sum():.3e}"
        )
        print(
            f"  wall time {r['seconds_wall'].sum():.2f} s over {summary.rounds_completed} rounds "
            f"(compute {r['seconds_compute'].sum():.2f} s, server CPU {100 * r['server_cpu'].mean():.1f}% of a core)"
        )
        print(simulated_time_line(r, summary.rounds_completed))
        print(comm_summary(args.file))
    return 0


def simulated_time_line(r: dict, done: int) -> str:
    """The simulated network's clock: total, per round, and what became of the selected clients; or that the
    run had no simulated network (docs/network.md)."""
    if "simulated_time" not in r:
        return "  simulated time: none (no simulated network, network.enabled false)"
    per = r["simulated_round_seconds"]
    counts = ", ".join(
        f"{label} {r[name].sum():.0f}"
        for name, label in (
            ("clients_unavailable", "unavailable"),
            ("clients_dropped", "dropped"),
            ("clients_missed_deadline", "missed the deadline"),
            ("clients_over_selected", "over-selected away"),
        )
        if name in r
    )
    return (
        f"  simulated time {r['simulated_time'][-1]:.2f} s over {done} rounds (per round: mean {per.mean():.3f} s, "
        f"min {per.min():.3f}, max {per.max():.3f}); selected clients: {r['clients_selected'].sum():.0f}, "
        f"trained {r['num_sampled'].sum():.0f}, {counts}"
    )


def _job(entry: dict) -> str:
    if "slurm_job_id" not in entry:
        return ""
    return f", SLURM job {entry['slurm_job_id']} restart {entry.get('slurm_restart_count', 0)}"


def segment_lines(attrs: dict, done: int) -> list[str]:
    """After a resume: one line per segment of the run (started, then each continuation) with its rounds
    (1-based), ranks and hosts; nothing for a run that was never continued."""
    resumes = attrs.get("resumes") or []
    if not resumes:
        return []
    first = {
        "time": attrs.get("created", "?"),
        "world_size": attrs["world_size"],
        "hosts": sorted(set(attrs["hosts"])),
        **{k: v for k, v in attrs.items() if k.startswith("slurm_")},
        "rounds_completed": 0,
    }
    segments = [first, *resumes]
    lines = [f"  {len(segments)} segments (the run was continued {len(resumes)} time(s)):"]
    for i, seg in enumerate(segments):
        start = int(seg["rounds_completed"]) + 1
        end = int(segments[i + 1]["rounds_completed"]) if i + 1 < len(segments) else done
        rounds = f"rounds {start}-{end}" if end >= start else "no round"
        verb = "started" if i == 0 else "resumed"
        lines.append(
            f"    {rounds}: {seg['world_size']} rank(s) on {', '.join(seg['hosts'])} ({verb} {seg['time']}{_job(seg)})"
        )
    return lines


def comm_summary(path) -> str:
    """Per message label over the committed rounds: calls, bytes, seconds and waiting (docs/communication.md).

    Calls are rank 0's (every rank makes the same calls); bytes are what all ranks sent; seconds and
    waiting are the sums over rounds of the slowest rank's per round, and rank 0's."""
    import numpy as np

    from ..store import read_comm

    labels, comm = read_comm(path)
    if not comm or not comm["calls"].any():
        return "  communication: nothing moved (one process)"
    zeros = np.zeros_like(comm["seconds"])
    waiting = comm.get("waiting", zeros)
    lines = [
        "  communication per message label (sums over rounds; max: slowest rank per round; 0: rank 0):",
        "  | label | calls | bytes sent | s max | s 0 | waiting s max | waiting s 0 |",
        "  |---|---:|---:|---:|---:|---:|---:|",
    ]
    for i, label in enumerate(labels):
        calls = comm["calls"][:, 0, i].sum()
        if not calls:
            continue
        seconds, wait = comm["seconds"][:, :, i], waiting[:, :, i]
        lines.append(
            f"  | {label} | {calls:.0f} | {comm['bytes_sent'][:, :, i].sum():.3e} | {seconds.max(axis=1).sum():.3f} "
            f"| {seconds[:, 0].sum():.3f} | {wait.max(axis=1).sum():.3f} | {wait[:, 0].sum():.3f} |"
        )
    if "waiting" not in comm:
        lines.append("  (written before waiting was recorded: waiting shows 0)")
    return "\n".join(lines)


def _last_evaluated(rounds: dict) -> list[int]:
    """[the index of the last round with an evaluated score], or [] before the first evaluation."""
    scores = [rounds[name] for name in ("val_acc", "test_acc", "val_rmse", "test_rmse") if name in rounds]
    evaluated = [i for i in range(len(scores[0]) if scores else 0) if any(not math.isnan(s[i]) for s in scores)]
    return evaluated[-1:]
