"""Every algorithm on the same pathological split: personalised accuracy, bytes and seconds per round.

Each shipped config (configs/*.yaml) contributes its algorithm section only; everything else is
common: scikit-learn's digits over 50 clients with 2 classes each (the pFedHN paper's split), an
MLP, the same rounds, sampling and client SGD (train.*), 3 seeds. Each run executes under mpiexec
(`pfl-mpi run -n P`) and writes its own HDF5 file; the table is computed from those files.

    .venv/bin/python benchmarks/personalization.py                  # all configs, seeds 0 1 2
    .venv/bin/python benchmarks/personalization.py --configs fedavg-synthetic default --seeds 0
    .venv/bin/python benchmarks/personalization.py --set train.client_batch=auto   # batched clients
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMMON = {
    "data.name": "digits",
    "data.num_clients": 50,
    "data.partition": "shards",
    "data.classes_per_client": 2,
    "data.test_fraction": 0.25,
    "model.name": "mlp",
    "model.hidden": "[64]",
    "model.head_layers": 1,
    "clients_per_round": 10,
    "state_every": 0,
    "finetune_epochs": 2,
    "train.local_epochs": 2,
    "train.batch_size": 16,
    "train.lr": 0.1,
}


def common_settings(config: Path) -> dict[str, object]:
    """COMMON without the train keys the config's algorithm would ignore (it refuses them)."""
    from pfl_mpi.algorithms import resolve
    from pfl_mpi.runtime.build import ignored_train_keys

    name = (yaml.safe_load(config.read_text()).get("algorithm") or {}).get("name", "fedavg")
    ignored = ignored_train_keys(resolve({"name": name})[0], int(COMMON["finetune_epochs"]))
    replaced = {f"train.{key}" for key in ignored}
    return {key: value for key, value in COMMON.items() if key not in replaced}


def run_one(config: Path, seed: int, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Run one config with the common settings; return its figures read back from the file."""
    sets = {**common_settings(config), "seed": seed, "rounds": args.rounds, "eval_every": args.rounds}
    sets["output"] = str(out)
    sets.update(dict(item.split("=", 1) for item in args.sets))
    cmd = [sys.executable, "-m", "pfl_mpi", "run", str(config), "-n", str(args.ranks), "--quiet", "--overwrite"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{config.name} seed {seed} failed:\n{done.stderr[-2000:]}")
    with h5py.File(out, "r") as f:
        r = f["rounds"]
        return {
            "accuracy": float(r["test_acc"][-1]),
            "finetuned": float(r["finetune_test_acc"][-1]),
            # the protocol's bytes (what the round's clients download and upload), the same on any number of ranks
            "bytes_per_round": float(np.mean(r["protocol_bytes_down"][:] + r["protocol_bytes_up"][:])),
            "seconds_per_round": float(np.median(r["seconds_wall"][1:-1])),
        }


def table(results: dict[str, list[dict[str, float]]]) -> str:
    """Markdown: mean and spread over seeds of each figure, one row per config."""
    lines = [
        "| algorithm (config) | personalised test accuracy | after local fine-tuning | protocol bytes per round "
        "| s per round |",
        "|---|---|---|---|---|",
    ]
    rows = sorted(results.items(), key=lambda kv: -np.mean([r["accuracy"] for r in kv[1]]))
    for label, runs in rows:
        acc = np.array([r["accuracy"] for r in runs])
        ft = np.array([r["finetuned"] for r in runs])
        lines.append(
            f"| {label} | {acc.mean():.3f} ± {acc.std():.3f} | {ft.mean():.3f} ± {ft.std():.3f} | "
            f"{np.mean([r['bytes_per_round'] for r in runs]):.3g} | "
            f"{np.median([r['seconds_per_round'] for r in runs]):.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", help="config stems (default: every configs/*.yaml)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--ranks", type=int, default=4, help="MPI ranks per run (server + workers)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's figures as JSON")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more setting for every run, e.g. train.client_batch=auto (repeatable)",
    )
    args = parser.parse_args()

    configs = sorted((ROOT / "configs").glob("*.yaml"))
    if args.configs:
        configs = [c for c in configs if c.stem in args.configs]
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            algorithm = (yaml.safe_load(config.read_text()).get("algorithm") or {}).get("name", "fedavg")
            label = f"{algorithm} ({config.stem})"
            for seed in args.seeds:
                figures = run_one(config, seed, args, Path(tmp) / f"{config.stem}-{seed}.h5")
                results.setdefault(label, []).append(figures)
                print(f"{label} seed {seed}: {figures}", file=sys.stderr, flush=True)
    text = (
        f"Digits, 50 clients with 2 classes each, MLP [64], {args.rounds} rounds, 10 clients per round, "
        f"{args.ranks} ranks, seeds {args.seeds}; accuracy after the last round (mean ± std over seeds), "
        "then after 2 epochs of local fine-tuning.\n\n" + table(results)
    )
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
