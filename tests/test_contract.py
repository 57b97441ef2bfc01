"""The contract every registered algorithm keeps, checked on each one through its shipped config (shortened).

- Every registered algorithm has a config under configs/ (the README's rule: one file plus its config).
- Resume equals a straight run, bit for bit: a run stopped after 2 rounds and resumed to 3 writes exactly
  what a 3-round run writes (timings aside).
- The evaluation payload is used if and only if the algorithm declares ``eval_down``: without it nothing
  goes down for evaluation and ``load_for_eval`` gets None; with it, another payload changes the evaluation.
- ``data.augment`` reaches every algorithm's client training (on digits): it changes round 1's train loss.
- An algorithm that does not opt in to batched clients says so ("not batched") in its module's docstring.
"""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from pfl_mpi.algorithms import resolve
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.config import load_config
from pfl_mpi.runtime import Engine

from .helpers import RecordingWorld, built_in_algorithms

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
SHORT = [
    "clients_per_round=4",
    "data.num_clients=10",
    "eval_every=1",
    "state_every=1",
    "train.local_epochs=1",
    "data.mnist1d.num_samples=1000",
]
TIMINGS = ("seconds", "cpu", "wall", "waiting")
GENERATED = ("digits", "mnist1d", "synthetic")  # data sets that ship with a package or are generated


def _config_of(algorithm: str) -> Path | None:
    """configs/<algorithm>.yaml, else the first config of the algorithm on a data set that needs no files."""
    for path in sorted(CONFIGS, key=lambda p: p.stem != algorithm):
        raw = yaml.safe_load(path.read_text()) or {}
        if raw.get("algorithm", {}).get("name") == algorithm and raw.get("data", {}).get("name") in GENERATED:
            return path
    return None


BUILT_IN = built_in_algorithms()


def _cfg(algorithm: str, out: Path, rounds: int):
    return load_config(_config_of(algorithm), [*SHORT, f"rounds={rounds}", f"output={out}"])


def _datasets(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return {k: v for k, v in out.items() if not any(t in k.rsplit("/", 1)[-1] for t in TIMINGS)}


def test_every_registered_algorithm_has_a_config():
    assert len(BUILT_IN) >= 20
    assert [name for name in BUILT_IN if _config_of(name) is None] == []


@pytest.mark.parametrize("algorithm", BUILT_IN)
def test_resume_equals_a_straight_run_bit_for_bit(tmp_path, algorithm):
    straight = _cfg(algorithm, tmp_path / "straight.h5", 3)
    assert Engine(straight, SerialWorld(), show_progress=False).run() == 0
    assert Engine(_cfg(algorithm, tmp_path / "resumed.h5", 2), SerialWorld(), show_progress=False).run() == 0
    resumed = Engine(_cfg(algorithm, tmp_path / "resumed.h5", 3), SerialWorld(), resume=True, show_progress=False)
    assert resumed.start_round == 2
    assert resumed.run() == 0
    a, b = _datasets(straight.output_path), _datasets(tmp_path / "resumed.h5")
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)


@pytest.mark.parametrize("algorithm", BUILT_IN)
def test_the_evaluation_payload_is_used_iff_declared(tmp_path, algorithm):
    world = RecordingWorld()
    engine = Engine(_cfg(algorithm, tmp_path / "run.h5", 1), world, show_progress=False)
    assert engine.run() == 0
    algo = engine.algo
    sent = [call for call in world.calls if call[1] == "eval_down"]
    plan = engine.evaluate.all_clients
    payloads = engine.transport.down(0, plan, "eval")
    k, payload = plan.order[0], payloads[0]
    if algo.eval_down is None:
        assert sent == [] and payload is None
        return
    assert sent and payload is not None

    def evaluation(payload: torch.Tensor) -> tuple[float, ...]:
        """What evaluation records for client k: its model's metrics, and the global model's if declared."""
        algo.load_for_eval(engine._client(k, 0), payload)
        out = algo.evaluate_client(engine._client(k, 0))
        if algo.evaluates_global:
            algo.load_global_for_eval(engine._client(k, 0), payload)
            out += algo.evaluate_client(engine._client(k, 0))
        return out

    noise = torch.randn(payload.shape, generator=torch.Generator().manual_seed(0))
    assert evaluation(payload + 10 * noise.to(payload.dtype)) != evaluation(payload)


@pytest.mark.parametrize("algorithm", BUILT_IN)
def test_augmentation_reaches_the_client_training(tmp_path, algorithm):
    """Per-FedAvg and FedMeta drew their batches without it (same loss on or off) until it was applied there."""
    config = _config_of(algorithm)
    sets = [*SHORT, "rounds=1"]
    if load_config(config, []).data.name != "digits":  # augmentation needs images
        sets += ["data.name=digits", "model.name=mlp"]
    losses = []
    for augment in ("null", "{crop_padding: 2, flip: true}"):
        cfg = load_config(config, [*sets, f"data.augment={augment}", f"output={tmp_path / augment[:4]}.h5"])
        assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
        with h5py.File(cfg.output_path, "r") as f:
            losses.append(float(f["rounds/train_loss"][0]))
    assert losses[0] != losses[1]


@pytest.mark.parametrize("algorithm", BUILT_IN)
def test_an_algorithm_that_trains_its_clients_one_by_one_says_so(algorithm):
    cls = resolve({"name": algorithm})[0]
    assert ("not batched" in sys.modules[cls.__module__].__doc__.lower()) != cls.batches_clients()
