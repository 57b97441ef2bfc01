"""Small configurations and readers shared by the tests."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from pfl_mpi.algorithms import algorithm_names, resolve
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.config import load_config
from pfl_mpi.errors import ConfigError
from pfl_mpi.models import build_model


def tiny_config(out: Path, algorithm: str = "fedavg", **overrides):
    """A run that takes about a second: 10 digits clients, 2 classes each, a small MLP."""
    sets = {
        "name": "tiny",
        "rounds": 3,
        "clients_per_round": 6,
        "eval_every": 1,
        "state_every": 2,
        "data.name": "digits",
        "data.num_clients": 10,
        "data.partition": "shards",
        "data.classes_per_client": 2,
        "model.name": "mlp",
        "model.hidden": "[16]",
        "train.local_epochs": 1,
        "train.batch_size": 8,
        "train.lr": 0.1,
        "algorithm.name": algorithm,
        "output": str(out),
    }
    try:
        ignored = resolve({"name": algorithm})[0].replaces_train  # train keys the algorithm refuses to be set
    except ConfigError:  # a plugin's algorithm, registered when the config imports it
        ignored = {}
    for key in ignored:
        sets.pop(f"train.{key}", None)
    sets.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def committed(path: Path, group: str, name: str) -> np.ndarray:
    """A per-round dataset of a run file, cut to the committed rounds."""
    with h5py.File(path, "r", locking=False) as f:
        return f[group][name][: int(f.attrs["rounds_completed"])]


def last_global_state(path: Path, name: str = "shared") -> np.ndarray:
    with h5py.File(path, "r", locking=False) as f:
        return f["global/state"][name][-1]


def initial_model(cfg, data):
    """The run's initial model: built under the run seed, as the runtime does."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, data.input_shape, data.num_classes)


def hand_sgd(model, names, x, y, lr, batch_size, generator, epochs):
    """Plain minibatch SGD on the parameters ``names`` only, one permutation per epoch from ``generator``."""
    params = [model.get_parameter(n) for n in names]
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            grads = torch.autograd.grad(F.cross_entropy(model(x[idx]), y[idx]), params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p -= lr * g


def flat(model, names):
    return torch.cat([model.get_parameter(n).detach().reshape(-1) for n in names])


def names_of(model, part):
    return [n for n, _ in model.named_parameters() if n.startswith(part)]


def build_algorithm(cfg, **params):
    """The algorithm of ``cfg`` (with ``params`` changed) on a fresh model, the data, and w_0 flat."""
    from pfl_mpi.data import load_federated
    from pfl_mpi.runtime.build import build_algorithm as build

    data = load_federated(cfg.data, cfg.seed)
    algo = build(cfg.model_copy(update={"algorithm": {**cfg.algorithm, **params}}), data)
    algo.init_server()
    return algo, data, algo.downlink(0, [], "train").clone()


class RecordingWorld(SerialWorld):
    """One process, as SerialWorld, that notes what each collective would move under MPI:
    ``calls`` holds (operation, label, dtype, bytes) per call, ``moved`` its (label, bytes)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str, np.dtype, int]] = []

    @property
    def moved(self) -> list[tuple[str, int]]:
        return [(label, nbytes) for _, label, _, nbytes in self.calls]

    def broadcast(self, buf, label):
        self.calls.append(("bcast", label, buf.dtype, buf.nbytes))

    def scatterv(self, send, counts, recv, label):
        self.calls.append(("scatterv", label, recv.dtype, recv.nbytes))
        super().scatterv(send, counts, recv, label)

    def reduce_sum(self, buf, label):
        self.calls.append(("reduce", label, buf.dtype, buf.nbytes))

    def gatherv(self, send, counts, recv, label):
        self.calls.append(("gatherv", label, send.dtype, send.nbytes))
        super().gatherv(send, counts, recv, label)

    def gather_rows(self, row, label):
        self.calls.append(("gather_rows", label, row.dtype, row.nbytes))
        return super().gather_rows(row, label)


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def process_tree(root: int) -> list[int]:
    """``root`` and every living process below it, parents before their children (from /proc)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and alive(int(entry)):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    found, frontier = [root], [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parent.items() if p == pid]
        found += children
        frontier += children
    return found


def kill_tree(root: int) -> None:
    """SIGKILL ``root`` and every process below it, the deepest first, and wait until they are gone: no
    process of the job gets to react (mpiexec runs in a session of its own, so a process group kill would
    not reach it or the ranks). ``root`` itself is left for its parent to reap (``Popen.wait``)."""
    import signal
    import time

    tree = process_tree(root)
    for pid in reversed(tree):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in tree[1:]):  # kill() returns before a loaded machine ends the process
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of job {root} outlived SIGKILL for 60 s")
        time.sleep(0.01)


def built_in_algorithms() -> list[str]:
    """The algorithms the package ships: the registry also holds what test plugins registered earlier in the
    same process."""
    return [n for n in algorithm_names() if resolve({"name": n})[0].__module__.startswith("pfl_mpi.algorithms.")]
