"""Personalised algorithms on a pathological split, each tuned on validation before it is scored on test.

For each data set (scikit-learn's digits with an MLP [64], MNIST-1D with cnn1d; 50 clients with 2 classes each,
pFedHN's split) and each algorithm:

1. tune: ``pfl-mpi sweep --tune --seeds 0`` runs the algorithm's ``tuning_grid`` (declared beside its Params,
   TUNING_TRIALS points each) with ``data.eval_on: [val, test]``, and picks the point with the best final
   ``val_acc`` (each client's validation split, carved from its training samples by ``data.val_fraction``);
2. test: the chosen values over seeds 0, 1, 2 (``pfl-mpi sweep``; seed 0's run is the chosen tuning run itself,
   which the sweep recognises as completed) -> final test accuracy, mean +- std over seeds, and the accuracy
   of the held-out novel clients (``data.novel_clients``) for the algorithms that serve them.

Equal budget (docs/tuning.md): every algorithm gets the same grid size, rounds, clients per round and batch
size; per round a sampled client trains ``--epochs`` E epochs; the algorithms counted in steps get
S = E * ceil(median training samples / batch) steps (pFedHN's inner_steps, Per-FedAvg's tau); the algorithms
that train two things share the E epochs: FedRep one body epoch after E - 1 head epochs, Ditto E/2 epochs of the
global model and E/2 of the personal one; FedMeta keeps one inner step on its support set (its protocol). Local
trains E epochs per round too, sampled like the others.

    .venv/bin/python benchmarks/personalization.py --readme           # this machine: ~20 min on 2 shared cores
    .venv/bin/python benchmarks/personalization.py --rounds 100 --epochs 5 --jobs 16 --ranks 1   # bigger machine
    .venv/bin/python benchmarks/personalization.py --datasets digits --algorithms fedavg local --rounds 5
    .venv/bin/python benchmarks/personalization.py --set train.client_batch=auto --out-dir runs/pers-batched
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "personalization-results.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- personalization-table:begin -->", "<!-- personalization-table:end -->"
# each algorithm's section from a shipped config (everything else is the data set's, below)
CONFIGS = {
    "fedavg": "fedavg-synthetic",
    "local": "local-mnist1d",
    "fedper": "default",
    "lgfedavg": "lgfedavg",
    "fedrep": "fedrep",
    "ditto": "ditto",
    "fedamp": "fedamp",
    "perfedavg": "perfedavg",
    "fedmeta": "fedmeta",
    "pfedhn": "pfedhn",
    "pfedhn-pc": "pfedhn-pc",
    "fedprox": "fedprox",
}
DEFAULT_ALGORITHMS = [a for a in CONFIGS if a != "fedprox"]
DATASETS = {
    "digits": {
        "label": "digits, MLP [64]",
        "rounds": 40,
        "lr": 0.1,
        "data": {"name": "digits", "test_fraction": 0.25},
        "model": {"name": "mlp", "hidden": [64], "head_layers": 1},
    },
    "mnist1d": {
        "label": "MNIST-1D, cnn1d",
        "rounds": 30,
        "lr": 0.05,
        "data": {"name": "mnist1d", "test_fraction": 0.2},
        "model": {"name": "cnn1d"},
    },
}
SPLIT = {"num_clients": 50, "partition": "shards", "classes_per_client": 2, "val_fraction": 0.2}
# --grid small: 2 of each algorithm's 4 declared points (a key's subset, the other key at one declared value),
# the same number for every algorithm; --grid full runs the declared grids
SMALL = {
    "default": {"train.lr": ["0.1", "0.3"]},
    "fedprox": {"algorithm.mu": ["0.01", "0.1"], "train.lr": ["0.3"]},
    "ditto": {"algorithm.lam": ["0.01", "0.1"], "train.lr": ["0.3"]},
    "fedamp": {"algorithm.lambda": ["0.01", "0.1"], "train.lr": ["0.3"]},
    "pfedhn": {"algorithm.inner_lr": ["0.05", "0.15"], "algorithm.lr": ["0.05"]},
    "pfedhn-pc": {"algorithm.inner_lr": ["0.05", "0.15"], "algorithm.lr": ["0.05"]},
    "perfedavg": {"algorithm.alpha": ["0.05", "0.1"], "algorithm.beta": ["0.1"]},
    "fedmeta": {"algorithm.alpha": ["0.2", "0.5"], "algorithm.beta": ["0.01"]},
}


def budget_steps(dataset: str, epochs: int, batch: int) -> int:
    """S = E * ceil(median training samples of a client / B): the steps of E epochs, for step-counted algorithms."""
    from pfl_mpi.config import load_config
    from pfl_mpi.data import load_federated

    sets = [f"data.{k}={json.dumps(v)}" for k, v in {**DATASETS[dataset]["data"], **SPLIT}.items()]
    data = load_federated(load_config(None, sets).data, 0)
    return epochs * math.ceil(float(np.median(data.train_sizes)) / batch)


def experiment(dataset: str, algorithm: str, args: argparse.Namespace, steps: int, novel: int) -> dict:
    """The config of one algorithm on one data set under the common budget (what the tuning sweep starts from)."""
    from pfl_mpi.algorithms import resolve
    from pfl_mpi.runtime.build import ignored_train_keys

    spec = DATASETS[dataset]
    section = dict(yaml.safe_load((ROOT / "configs" / f"{CONFIGS[algorithm]}.yaml").read_text())["algorithm"])
    e = args.epochs  # E passes over a client's data per round, whatever the algorithm does with them:
    split = {  # FedRep: one body epoch, the rest its head's; Ditto: E/2 epochs for w, the rest for v_k
        "fedrep": {"tau_b": 1, "tau_h": max(1, e - 1)},
        "ditto": {"personal_epochs": max(1, e - e // 2)},
        "perfedavg": {"tau": steps},
    }
    section.update(split.get(algorithm, {}))
    if algorithm.startswith("pfedhn"):
        section["inner_steps"] = steps
    if algorithm == "fedprox":
        section["straggler_fraction"] = 0.0  # every client trains its E epochs
    train = {
        "local_epochs": max(1, e // 2) if algorithm == "ditto" else e,
        "batch_size": args.batch_size,
        "lr": spec["lr"],
    }
    ignored = ignored_train_keys(resolve(section)[0], 0)
    data = {**spec["data"], **SPLIT, **({"novel_clients": novel} if novel else {})}
    # serving a novel client: novel_epochs epochs of local training, or pFedHN's embedding steps of the same
    # local work (each step runs inner_steps = S local steps, i.e. E epochs)
    serving = {"novel": {"epochs": args.novel_epochs, "steps": max(1, args.novel_epochs // args.epochs)}}
    config = {
        "name": algorithm,
        "seed": 0,
        "rounds": args.rounds or spec["rounds"],
        "clients_per_round": args.clients_per_round,
        "eval_every": args.rounds or spec["rounds"],
        "state_every": 0,
        "data": data,
        "model": spec["model"],
        "train": {k: v for k, v in train.items() if k not in ignored},
        "algorithm": section,
        **(serving if novel else {}),
    }
    for item in args.set:  # --set KEY=VALUE: into every run (a train key the algorithm ignores stays out)
        key, value = item.split("=", 1)
        *path, leaf = key.split(".")
        if path == ["train"] and leaf in ignored:
            continue
        section = config
        for part in path:
            section = section.setdefault(part, {})
        section[leaf] = yaml.safe_load(value)
    return config


def serves_novel(algorithm: str) -> bool:
    from pfl_mpi.algorithms import resolve

    return bool(getattr(resolve({"name": algorithm})[0], "serves_novel", False))


def small_grid(algorithm: str) -> dict[str, list[str]]:
    """The algorithm's small grid, checked to be a 2-point subset of its declared grid."""
    from pfl_mpi.algorithms import resolve
    from pfl_mpi.tuning import check_tuning_grid

    declared = dict(check_tuning_grid(resolve({"name": algorithm})[0]))
    small = SMALL.get(algorithm, SMALL["default"])
    if small.keys() != declared.keys() or any(not set(v) <= set(declared[k]) for k, v in small.items()):
        raise SystemExit(f"benchmark: the small grid of {algorithm} {small} is not a subset of its grid {declared}")
    if math.prod(len(v) for v in small.values()) != 2:
        raise SystemExit(f"benchmark: the small grid of {algorithm} has not 2 points")
    return small


def compatible_groups(algorithms: list[str]) -> list[list[str]]:
    """Algorithms grouped so that a key shared within a group has one small grid (one sweep per group)."""
    groups: list[tuple[list[str], dict[str, list[str]]]] = []
    for algorithm in algorithms:
        small = small_grid(algorithm)
        for members, keys in groups:
            if all(keys.get(k, v) == v for k, v in small.items()):
                members.append(algorithm)
                keys.update(small)
                break
        else:
            groups.append(([algorithm], dict(small)))
    return [members for members, _ in groups]


def sweep(configs: list[Path], extra: list[str], runs: Path, args: argparse.Namespace, tuning: bool = False) -> None:
    """``pfl-mpi sweep`` of ``configs`` into ``runs`` (its output passed through); raises if a run failed, except
    in ``tuning``, where a trial that diverged is an answer (it is not chosen) as long as every config got a choice."""
    command = [sys.executable, "-m", "pfl_mpi", "sweep", *map(str, configs), "--runs-dir", str(runs)]
    command += ["--jobs", str(args.jobs), "--no-report", *extra]
    command += ["-n", str(args.ranks)] if args.ranks > 1 else ["--in-process"]
    print("$", " ".join(command), flush=True)
    if subprocess.call(command, cwd=ROOT) == 0:
        return
    record = runs / "tuning.json"
    chosen = json.loads(record.read_text()) if tuning and record.exists() else {}
    if not all(Path(c).stem in chosen for c in configs):
        raise SystemExit(f"benchmark: the sweep into {runs} failed (its logs: {runs / 'logs'})")


def tuned_config(config: dict, chosen: list[str]) -> dict:
    """``config`` with the chosen ``KEY=VALUE`` settings (JSON values) written in, evaluated on val and test."""
    tuned = json.loads(json.dumps(config))
    for item in chosen:
        key, _, value = item.partition("=")
        *path, last = key.split(".")
        node = tuned
        for part in path:
            node = node.setdefault(part, {})
        node[last] = json.loads(value)
    tuned["data"]["eval_on"] = ["val", "test"]
    return tuned


def reuse_tuning_run(tuning_file: Path, test_file: Path, config: Path) -> bool:
    """Copy the chosen tuning run (seed 0) to the test sweep's seed-0 file when it holds the same experiment."""
    from pfl_mpi.commands.sweep import state_of
    from pfl_mpi.config import load_config

    if test_file.exists() or not tuning_file.exists():
        return False
    test_file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tuning_file, test_file)
    if state_of(test_file, load_config(config, ["seed=0"])) == "completed":
        return True
    test_file.unlink()
    return False


def final(path: Path, metric: str) -> float:
    """The last finite value of /rounds/<metric> (NaN if the run did not record it)."""
    with h5py.File(path, "r", locking=False) as f:
        if metric not in f["rounds"]:
            return math.nan
        values = f["rounds"][metric][: int(f.attrs["rounds_completed"])]
    values = values[np.isfinite(values)]
    return float(values[-1]) if values.size else math.nan


def run_dataset(dataset: str, args: argparse.Namespace) -> dict:
    """Tune then test every algorithm on ``dataset``; the figures of each."""
    out = args.out_dir / dataset
    steps = budget_steps(dataset, args.epochs, args.batch_size)
    configs, tuned = {}, {}
    for algorithm in args.algorithms:
        novel = args.novel_clients if serves_novel(algorithm) else 0
        configs[algorithm] = out / "configs" / f"{algorithm}.yaml"
        configs[algorithm].parent.mkdir(parents=True, exist_ok=True)
        configs[algorithm].write_text(
            yaml.safe_dump(experiment(dataset, algorithm, args, steps, novel), sort_keys=False)
        )
    start = time.monotonic()
    tune = ["--tune", "--seeds", "0", *(x for item in args.set_grid for x in ("--set-grid", item))]
    if args.grid == "full":  # one sweep of every declared grid
        sweep(list(configs.values()), tune, out / "tune", args, tuning=True)
    else:  # as few sweeps as the subsets allow: a --set-grid key replaces its values in the grids declaring it
        for group in compatible_groups(list(configs)):
            grid = {k: v for algorithm in group for k, v in small_grid(algorithm).items()}
            items = [x for key, values in grid.items() for x in ("--set-grid", f"{key}={','.join(values)}")]
            sweep([configs[a] for a in group], [*tune, *items], out / "tune", args, tuning=True)
    tuning_seconds = time.monotonic() - start
    record = json.loads((out / "tune" / "tuning.json").read_text())
    for algorithm, path in configs.items():
        chosen = record[algorithm]["set"]
        tuned[algorithm] = out / "tuned" / f"{algorithm}.yaml"
        tuned[algorithm].parent.mkdir(parents=True, exist_ok=True)
        text = tuned_config(yaml.safe_load(path.read_text()), chosen)
        tuned[algorithm].write_text(yaml.safe_dump(text, sort_keys=False))
        best_run = out / "tune" / f"{algorithm}-{'-'.join(_labels(record[algorithm]['best']))}.h5"
        reuse_tuning_run(best_run, out / "test" / f"{algorithm}-s0.h5", tuned[algorithm])
    start = time.monotonic()
    seeds = ["--seeds", *map(str, args.seeds)]
    sweep(list(tuned.values()), seeds, out / "test", args)
    test_seconds = time.monotonic() - start
    rows = {}
    for algorithm in args.algorithms:
        files = [
            out / "test" / (f"{algorithm}-s{s}.h5" if len(args.seeds) > 1 else f"{algorithm}.h5") for s in args.seeds
        ]
        trials = record[algorithm]["trials"]
        rows[algorithm] = {
            "chosen": record[algorithm]["best"],
            "val": record[algorithm]["best_score"],
            "trials": {" ".join(f"{k}={v}" for k, v in t["point"].items()): t["score"] for t in trials},
            "test": [final(f, "test_acc") for f in files],
            "novel": [final(f, "novel_test_acc") for f in files],
        }
    return {"steps": steps, "rows": rows, "tuning_seconds": tuning_seconds, "test_seconds": test_seconds}


def _labels(point: dict[str, str]) -> list[str]:
    """A grid point's part of the run name, as ``pfl_mpi.grid`` writes it."""
    from pfl_mpi.grid import _label

    return [_label(v) for v in point.values()]


def _mean_std(values: list[float]) -> str:
    values = np.array(values, dtype=float)
    if not np.isfinite(values).any():
        return "-"
    return f"{np.nanmean(values):.3f} ± {np.nanstd(values):.3f}"


def table(result: dict) -> str:
    """Markdown: one row per algorithm, best test accuracy first."""
    lines = [
        "| algorithm | chosen on val (seed 0) | val acc | test acc | novel-client test acc |",
        "|---|---|---|---|---|",
    ]
    rows = sorted(result["rows"].items(), key=lambda kv: -np.nanmean(kv[1]["test"]))
    for algorithm, row in rows:
        chosen = ", ".join(f"{k.split('.', 1)[1]} {v}" for k, v in row["chosen"].items())
        lines.append(
            f"| {algorithm} | {chosen} | {row['val']:.3f} | {_mean_std(row['test'])} | {_mean_std(row['novel'])} |"
        )
    return "\n".join(lines)


def grids(args: argparse.Namespace) -> str:
    """The grids searched, one line per algorithm."""
    from pfl_mpi.algorithms import resolve
    from pfl_mpi.tuning import check_tuning_grid

    lines = []
    for algorithm in args.algorithms:
        grid = dict(check_tuning_grid(resolve({"name": algorithm})[0]))
        if args.grid == "small":
            grid = small_grid(algorithm)
        lines.append(f"- {algorithm}: " + " x ".join(f"`{k}` in {{{', '.join(v)}}}" for k, v in grid.items()))
    return "\n".join(lines)


def report(results: dict, args: argparse.Namespace) -> str:
    """The results file: how it was tuned and run, then a table per data set."""
    trials = "2 of the 4 points (`--grid small`)" if args.grid == "small" else "the 4 points"
    command = " ".join(a for a in sys.argv[1:] if a not in ("--report-only", "--readme"))
    parts = [
        f"Generated by `benchmarks/personalization.py {command}`. 50 clients with 2 classes each; "
        "20% of each client's training samples held out "
        f"as its validation set; {args.clients_per_round} clients per round; batch {args.batch_size}; "
        f"E = {args.epochs} local epochs per round, S steps for the algorithms counted in steps (docs/tuning.md).",
        "",
        f"Tuning: {trials} of each algorithm's `tuning_grid` (declared beside its Params) ran on seed 0 with "
        "`pfl-mpi sweep --tune`, which chose the point with the best final validation accuracy; the chosen point "
        f"then ran on seeds {', '.join(map(str, args.seeds))} (seed 0: the tuning run itself). Test accuracy "
        "after the last round, mean ± std over the seeds, over the clients that trained. Novel-client accuracy: "
        f"{args.novel_clients} clients held out of training (`data.novel_clients`), each served after the last "
        f"round by its algorithm's rule with {args.novel_epochs} epochs of adaptation (pFedHN: "
        f"{max(1, args.novel_epochs // args.epochs)} embedding steps of E epochs each; Per-FedAvg and FedMeta "
        'their own step) and scored on its test split. "-": the algorithm does not serve novel clients; it '
        "then trains with all 50 clients.",
        "",
        "Grids searched:",
        grids(args),
    ]
    for dataset, result in results.items():
        spec = DATASETS[dataset]
        parts += [
            "",
            f"**{spec['label']}**, {args.rounds or spec['rounds']} rounds, S = {result['steps']} steps per round",
            "",
            table(result),
        ]
    return "\n".join(parts) + "\n"


def write_readme(text: str) -> None:
    """Replace the README's table between its markers with ``text``."""
    readme = README.read_text()
    head, sep, rest = readme.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} section")
    README.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--algorithms", nargs="+", choices=list(CONFIGS), default=DEFAULT_ALGORITHMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="test seeds (tuning: seed 0)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: digits 40, MNIST-1D 30)")
    parser.add_argument("--epochs", type=int, default=2, help="E: local epochs per round, the budget (default 2)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--novel-clients", type=int, default=10, help="held-out clients (0: none)")
    parser.add_argument(
        "--novel-epochs", type=int, default=10, help="epochs a novel client adapts (pFedHN: steps of E epochs each)"
    )
    parser.add_argument(
        "--grid", choices=["full", "small"], default="full", help="full: the declared grids; small: 2 points each"
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--ranks", type=int, default=1, help="MPI ranks per run (results are the same on any)")
    parser.add_argument(
        "--set-grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="--grid full: replace or add a grid key for every algorithm (pfl-mpi sweep --set-grid)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config key for every run, e.g. train.client_batch=auto (batched clients: the same table)",
    )
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "personalization")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the markdown results file")
    parser.add_argument("--readme", action="store_true", help="also regenerate README.md's personalisation table")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the results (and --readme) from OUT_DIR/results.json, run nothing",
    )
    args = parser.parse_args()
    if 0 not in args.seeds:
        parser.error("--seeds must include 0, the tuning seed")

    saved = args.out_dir / "results.json"
    if args.report_only:
        results = {k: v for k, v in json.loads(saved.read_text()).items() if k in args.datasets}
    else:
        results = {dataset: run_dataset(dataset, args) for dataset in args.datasets}
        saved.write_text(json.dumps(results, indent=1))
    text = report(results, args)
    print(text)
    args.results.write_text(text)
    if args.readme:
        write_readme(text)


if __name__ == "__main__":
    main()
