"""FedMD: logits on a public subset up, their (weighted) mean down, digest and revisit; public data held apart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pfl_mpi.algorithms import Client
from pfl_mpi.algorithms.fedmd import alignment_indices
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.data import load_federated, pooled
from pfl_mpi.data.public import holdout_positions, load_public
from pfl_mpi.errors import ConfigError
from pfl_mpi.models import ParamLayout, build_models
from pfl_mpi.runtime import Engine
from pfl_mpi.runtime.build import build_algorithm, check_buildable
from pfl_mpi.seeding import client_generator
from pfl_mpi.store import read_clients

from .helpers import committed, tiny_config
from .test_e2e import TINY, pfl

TWO = "[{hidden: [16]}, {name: cnn2d, cnn2d_fc: [16]}]"  # an MLP and a CNN on digits
PUBLIC, ALIGNMENT, CLASSES = 120, 40, 10


def _config(out: Path, **overrides):
    sets = {
        "model.architectures": TWO,
        "data.public": f"{{source: holdout, size: {PUBLIC}}}",
        "algorithm.alignment_size": ALIGNMENT,
        "algorithm.logits_matching_batch_size": 16,
        "algorithm.public_epochs": 2,
        "algorithm.public_batch_size": 16,
        "algorithm.private_epochs": 1,
        "state_every": 1,
        **overrides,
    }
    return tiny_config(out, "fedmd", **sets)


def _run(cfg, resume: bool = False, world=None) -> Engine:
    engine = Engine(cfg, world or SerialWorld(), resume=resume, show_progress=False)
    assert engine.run() == 0
    return engine


def _algorithm(cfg, **params):
    """FedMD built as the runtime builds it: the data loaded first, one model per architecture."""
    data = load_federated(cfg.data, cfg.seed)
    algo = build_algorithm(cfg.model_copy(update={"algorithm": {**cfg.algorithm, **params}}), data)
    algo.init_server()
    return algo, data


def _model(cfg, data, group: int, vector) -> torch.nn.Module:
    """A fresh model of architecture ``group`` holding the flat parameters ``vector``."""
    model = build_models(cfg.model, data.input_shape, data.num_classes, 0)[group]
    ParamLayout(model, [n for n, _ in model.named_parameters()]).load(model, torch.as_tensor(vector))
    return model


_CFG = _config(Path("unused.h5"))  # never run


# -- the consensus ------------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["uniform", "samples"])
def test_consensus_is_the_weighted_mean_of_the_clients_logits_on_the_rounds_public_subset(tmp_path, weighting):
    """Two rounds, 6 of 10 clients each, an MLP and a CNN: the consensus of round t in the file equals the mean
    (uniform, or weighted by training samples) of the logits that the sampled clients' trained models (their
    states in the file) give on round t's public subset, recomputed here."""
    cfg = _config(tmp_path / "md.h5", rounds=2, clients_per_round=6, **{"algorithm.weighting": weighting})
    _run(cfg)
    data, public = load_federated(cfg.data, cfg.seed), load_public(cfg.data, cfg.seed)
    sampled = read_clients(cfg.output_path, "participated").astype(bool)
    with h5py.File(cfg.output_path) as f:
        consensus = f["global/state/consensus"][...]
        rows, groups = f["partition/group_row"][...], f["partition/group"][...]
        states = [f[f"clients/state/group{g}/model"][...] for g in range(2)]
    assert consensus.shape == (2, ALIGNMENT * CLASSES)
    for t in range(2):
        x = public.x[alignment_indices(cfg.seed, t, PUBLIC, ALIGNMENT)]
        clients = np.flatnonzero(sampled[t])
        assert len(clients) == 6 and len(set(groups[clients])) == 2  # both architectures took part
        with torch.no_grad():
            logits = [_model(cfg, data, groups[k], states[groups[k]][t, rows[k]])(x).numpy() for k in clients]
        weights = np.ones(6) if weighting == "uniform" else data.train_sizes[clients].astype(float)
        expected = np.tensordot(weights / weights.sum(), np.stack(logits), axes=1)
        np.testing.assert_allclose(consensus[t].reshape(ALIGNMENT, CLASSES), expected, rtol=1e-5, atol=1e-5)


def test_public_subset_is_a_function_of_seed_and_round_alone():
    """The same subset in another process (another rank) whatever its global RNG; a new one every round."""
    subsets = [alignment_indices(3, t, PUBLIC, ALIGNMENT) for t in range(3)]
    for s in subsets:
        assert len(set(s.tolist())) == ALIGNMENT and 0 <= int(s.min()) and int(s.max()) < PUBLIC
    assert all(set(a.tolist()) != set(b.tolist()) for i, a in enumerate(subsets) for b in subsets[i + 1 :])
    code = (
        "import torch; torch.manual_seed(12345); torch.rand(7);"
        "from pfl_mpi.algorithms.fedmd import alignment_indices;"
        f"print([alignment_indices(3, t, {PUBLIC}, {ALIGNMENT}).tolist() for t in range(3)])"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert other.stdout.strip() == str([s.tolist() for s in subsets])


def test_digest_moves_the_logits_toward_the_consensus():
    """Digest epochs on a subset pull the CNN client's logits there toward a consensus (here the logits of the
    MLP group's start model on the same samples), under either distance."""
    for loss in ("l1", "mse"):
        algo, data = _algorithm(_CFG, digest_loss=loss, logits_matching_epochs=5, digest_lr=0.1)
        k = 1  # the CNN
        client = Client(k, 1, data.client(k), algo.init_client_state(k), client_generator(0, k, 1))
        model = algo.setup.model_for(k)
        algo.personal.layouts[1].load(model, client.state["model"])
        x = algo.public_x[algo.subset(0)]
        distance = F.l1_loss if loss == "l1" else F.mse_loss
        with torch.no_grad():
            consensus = _model(_CFG, data, 0, algo.init_client_state(0)["model"])(x)
            before = float(distance(model(x), consensus))
        digest_loss = algo.digest(client, model, x, consensus)
        with torch.no_grad():
            after = float(distance(model(x), consensus))
        assert after < 0.5 * before and 0 < digest_loss < before, (loss, before, digest_loss, after)


def test_transfer_learning_start_trains_each_architecture_on_the_public_data_once():
    """A client's initial state is its architecture's initialisation trained on the labelled public data (the
    same for every client of the group); its first update trains on its private data and marks it started."""
    algo, data = _algorithm(_CFG, public_epochs=3)
    untrained, _ = _algorithm(_CFG, public_epochs=0)
    public = load_public(_CFG.data, _CFG.seed)
    for g, (a, b) in enumerate([(0, 2), (1, 3)]):
        start, again = algo.init_client_state(a), algo.init_client_state(b)
        torch.testing.assert_close(start["model"], again["model"], rtol=0, atol=0)
        assert float(start["started"]) == 0.0
        raw = untrained.init_client_state(a)["model"]
        initial = algo.personal.initial[g]
        torch.testing.assert_close(raw, initial, rtol=0, atol=0)  # public_epochs = 0: the initialisation
        with torch.no_grad():
            trained = F.cross_entropy(_model(_CFG, data, g, start["model"])(public.x), public.y)
            initial = F.cross_entropy(_model(_CFG, data, g, raw)(public.x), public.y)
        assert float(trained) < float(initial)
    k = 0
    client = Client(k, 0, data.client(k), algo.init_client_state(k), client_generator(0, k, 0))
    before = client.state["model"].clone()
    update = algo.client_update(client, algo.downlink(0, [k], "train"))
    assert float(client.state["started"]) == 1.0 and not torch.equal(before, client.state["model"])
    assert update.metrics["train_loss"] > 0 and update.metrics["digest_loss"] == 0.0  # round 0: nothing to digest


# -- public data --------------------------------------------------------------------------------


def _rows(x: np.ndarray) -> np.ndarray:
    """Rows of x flattened and sorted lexicographically (a multiset of samples)."""
    flat = x.reshape(len(x), -1)
    return flat[np.lexsort(flat.T[::-1])]


def test_holdout_public_data_are_disjoint_from_the_clients_data():
    """The clients' samples and the public ones together are exactly the digits pool, each sample once."""
    cfg = _CFG.data
    data, public = load_federated(cfg, 0), load_public(cfg, 0)
    clients = [data.client(k) for k in range(data.num_clients)]
    held = np.concatenate([public.x.numpy(), *(np.concatenate([c.x_train, c.x_test]) for c in clients)])
    pool = pooled.digits()
    assert len(public) == PUBLIC and int(data.train_sizes.sum() + data.test_sizes.sum()) == len(pool.y) - PUBLIC
    np.testing.assert_array_equal(_rows(held), _rows(pool.x))
    np.testing.assert_array_equal(public.x.numpy(), pool.x[public.positions])
    np.testing.assert_array_equal(public.y.numpy(), pool.y[public.positions])


def test_holdout_derives_from_the_data_seed():
    cfg = _CFG.data
    assert not np.array_equal(load_public(cfg, 0).positions, load_public(cfg, 1).positions)
    fixed = cfg.model_copy(update={"seed": 5})
    np.testing.assert_array_equal(load_public(fixed, 0).positions, load_public(fixed, 1).positions)
    np.testing.assert_array_equal(load_public(fixed, 0).positions, holdout_positions(len(pooled.digits().y), PUBLIC, 5))


def test_another_data_set_as_public_data():
    """MNIST-1D clients with a public set generated by MNIST-1D under another seed: the clients keep every sample."""
    sets = {"data.name": "mnist1d", "data.mnist1d.num_samples": 500, "model.architectures": "[{}, {hidden: [8]}]"}
    cfg = _config(Path("unused.h5"), **sets, **{"data.public": "{source: mnist1d, size: 95, mnist1d_seed: 3}"})
    data, public = load_federated(cfg.data, 0), load_public(cfg.data, 0)
    assert int(data.train_sizes.sum() + data.test_sizes.sum()) == 500
    assert public.x.shape == (95, 1, 40) and set(public.y.tolist()) <= set(range(10))
    assert public.source == "mnist1d"


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"data.public": "null"}, "data.public"),
        ({"algorithm.alignment_size": PUBLIC + 1}, "algorithm.alignment_size"),
        ({"data.public": "{source: holdout, size: 1797}"}, "data.public.size"),
        ({"data.public": "{source: digits, size: 10}"}, "data.public.source"),
        ({"data.public": "{source: mnist1d, size: 10}"}, "data.public.source"),  # another input shape
    ],
)
def test_bad_public_data_name_their_key_before_mpi_starts(overrides, key):
    with pytest.raises(ConfigError) as info:
        cfg = _config(Path("unused.h5"), **overrides)
        check_buildable(cfg, load_federated(cfg.data, cfg.seed))  # what `pfl-mpi run` does before starting ranks
    assert info.value.key == key


def test_missing_public_data_exit_2_with_one_line(tmp_path):
    run = pfl("run", "--out", str(tmp_path / "x.h5"), *TINY, "--set", "algorithm.name=fedmd")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "pfl-mpi: config error: data.public: fedmd needs a public data set: set data.public.size "
        "(and data.public.source)"
    ]


# -- messages, architectures, resume ------------------------------------------------------------


class _Recorder(SerialWorld):
    """One process that notes the bytes of every Reduce, by label."""

    def __init__(self):
        super().__init__()
        self.reduced: list[tuple[str, int]] = []

    def reduce_sum(self, buf, label):
        self.reduced.append((label, buf.nbytes))
        super().reduce_sum(buf, label)


@pytest.mark.parametrize("architectures", [TWO, "[{hidden: [4]}, {hidden: [128, 64]}]"])
def test_bytes_up_are_the_logits_whatever_the_architectures(tmp_path, architectures):
    world = _Recorder()
    engine = _run(_config(tmp_path / "b.h5", rounds=2, **{"model.architectures": architectures}), world=world)
    assert len({layout.numel for layout in engine.algo.personal.layouts}) == 2
    assert [r for r in world.reduced if r[0] == "up"] == [("up", (ALIGNMENT * CLASSES + 1) * 4)] * 2


def test_two_architectures_on_three_ranks_through_the_command_line(tmp_path):
    """configs/fedmd.yaml, shortened, on 3 ranks: each worker sends alignment_size x C float32 logits and one
    float32 weight per round, one Reduce; an MLP and a CNN in one job; the consensus is written every round."""
    out = tmp_path / "md.h5"
    sets = ("rounds=2", "data.num_clients=10", "eval_every=2", "state_every=1", "algorithm.public_epochs=5")
    run = pfl(
        "run", "configs/fedmd.yaml", "-n", "3", "--out", str(out), "--quiet",
        *(a for s in sets for a in ("--set", s)),
        cwd=str(Path(__file__).parents[1]),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    with h5py.File(out) as f:
        labels = json.loads(f.attrs["comm_labels"])
        sent = f["comm/bytes_sent"][...]
        n = f["global/state/consensus"].shape[1]
        widths = [f[f"clients/state/group{g}/model"].shape[2] for g in (0, 1)]
        np.testing.assert_array_equal(f["partition/group"][...], np.arange(10) % 2)
        assert f["rounds/test_acc"][-1] > 0.5
    assert n == 200 * CLASSES and widths[0] != widths[1]
    np.testing.assert_array_equal(sent[:, 1:, labels.index("up")], (n + 1) * 4)


def test_resume_equals_an_unbroken_run(tmp_path):
    def config(name, rounds):
        return _config(tmp_path / f"{name}.h5", rounds=rounds, clients_per_round=4)

    straight = config("straight", 4)
    _run(straight)
    _run(config("resumed", 2))
    rest = config("resumed", 4)
    assert _run(rest, resume=True).start_round == 2
    for name in ("train_loss", "test_acc", "consensus_acc"):
        np.testing.assert_allclose(
            committed(rest.output_path, "rounds", name), committed(straight.output_path, "rounds", name), atol=1e-6
        )
    with h5py.File(straight.output_path) as a, h5py.File(rest.output_path) as b:
        for key in (
            "global/state/consensus",
            *(f"clients/state/group{g}/{s}" for g in (0, 1) for s in ("model", "started")),
        ):
            assert b[key].shape == a[key].shape
            np.testing.assert_allclose(b[key][...], a[key][...], rtol=0, atol=1e-6, err_msg=key)
