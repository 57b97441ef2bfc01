"""Clients with different architectures: config, models per group, per-client sizes, per-group state and files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pfl_mpi.algorithms import Collected
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.config import load_config
from pfl_mpi.data import load_federated
from pfl_mpi.errors import ConfigError
from pfl_mpi.models import build_model, build_models
from pfl_mpi.runtime import Engine
from pfl_mpi.runtime.build import check_buildable
from pfl_mpi.runtime.client_store import ClientStore
from pfl_mpi.store import read_client_states, read_clients
from pfl_mpi.store.layout import StateLayout

from .helpers import committed, tiny_config
from .test_e2e import TINY, pfl

sys.path.insert(0, str(Path(__file__).parent / "plugins"))
TWO = "[{hidden: [16]}, {name: cnn2d, cnn2d_fc: [16]}]"  # an MLP and a CNN, both built for digits, d = 16
HETERO = ["plugins=[hetero_echo]", "algorithm.name=hetero_echo"]  # an algorithm that accepts several


def _echo(out: Path, **overrides):
    """hetero_echo (tests/plugins) with an MLP for clients 0-4 and a CNN for clients 5-9."""
    sets = {
        "plugins": "[hetero_echo]",
        "model.architectures": TWO,
        "model.assignment": "blocks",
        "state_every": 1,
        **overrides,
    }
    return tiny_config(out, "hetero_echo", **sets)


def _run(cfg, resume: bool = False) -> Engine:
    engine = Engine(cfg, SerialWorld(), resume=resume, show_progress=False)
    assert engine.run() == 0
    return engine


# -- configuration ------------------------------------------------------------------------------


def test_architectures_inherit_the_section_and_are_assigned_by_rule():
    cfg = load_config(
        None,
        [
            *HETERO,
            "model.hidden=[16]",
            "model.head_layers=1",
            "model.architectures=[{}, {name: cnn2d}, {hidden: [8, 4], head_layers: 2}]",
        ],
    )
    a, b, c = cfg.model.specs()
    assert (a.name, a.hidden, a.head_layers) == ("mlp", [16], 1)
    assert (b.name, b.cnn2d_fc) == ("cnn2d", [120, 84])
    assert (c.name, c.hidden, c.head_layers) == ("mlp", [8, 4], 2)
    assert cfg.model.groups(7).tolist() == [0, 1, 2, 0, 1, 2, 0]  # round_robin: k mod G
    blocks = load_config(None, [*HETERO, "model.architectures=[{}, {}, {}]", "model.assignment=blocks"]).model
    assert blocks.groups(7).tolist() == [0, 0, 0, 1, 1, 2, 2]  # contiguous ranges, sizes differ by at most 1
    assert blocks.groups(9).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    again = load_config(None, [*HETERO, f"model={json.dumps(cfg.model.model_dump(mode='json'))}"])
    assert again.model == cfg.model  # the written configuration reads back the same (resume)


def test_one_architecture_is_the_plain_model(tmp_path):
    plain = load_config(None, ["model.hidden=[16]"])
    listed = load_config(None, ["model.architectures=[{hidden: [16]}]"])
    assert plain.model.groups(5).tolist() == listed.model.groups(5).tolist() == [0] * 5
    data = load_federated(plain.data, plain.seed)
    (a,), (b,) = (build_models(c.model, data.input_shape, data.num_classes, 0) for c in (plain, listed))
    for (n, p), (m, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert n == m and torch.equal(p, q)


def test_each_architecture_is_initialised_from_the_seed_alone():
    cfg = load_config(None, [*HETERO, f"model.architectures={TWO}"])
    data = load_federated(cfg.data, cfg.seed)
    models = build_models(cfg.model, data.input_shape, data.num_classes, seed=7)
    after = torch.rand(3)
    for spec, model in zip(cfg.model.specs(), models, strict=True):
        torch.manual_seed(7)
        alone = build_model(spec, data.input_shape, data.num_classes)
        for (n, p), (m, q) in zip(model.named_parameters(), alone.named_parameters(), strict=True):
            assert n == m and torch.equal(p, q)
    torch.manual_seed(7)
    build_model(cfg.model.specs()[0], data.input_shape, data.num_classes)
    assert torch.equal(torch.rand(3), after)  # the random stream continues as after the first model alone


def test_an_algorithm_without_heterogeneous_support_is_refused():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["algorithm.name=fedavg", f"model.architectures={TWO}"])
    assert info.value.key == "model.architectures"
    assert "fedavg" in str(info.value) and "\n" not in str(info.value)
    load_config(None, ["algorithm.name=fedavg", "model.architectures=[{hidden: [16]}]"])  # one is fine


def test_bad_architectures_name_their_key():
    with pytest.raises(ConfigError) as info:
        load_config(None, [*HETERO, "model.architectures=[{}, {hidden: [0]}]"])
    assert info.value.key.startswith("model.architectures.1.hidden")
    with pytest.raises(ConfigError) as info:
        load_config(None, [*HETERO, "data.num_clients=2", "model.architectures=[{}, {}, {}]", "clients_per_round=2"])
    assert info.value.key == "model.architectures"
    cfg = load_config(None, [*HETERO, "model.architectures=[{}, {name: cnn1d}]"])
    with pytest.raises(ConfigError) as info:  # cnn1d cannot take 8 x 8 images: found when the models are built
        check_buildable(cfg, load_federated(cfg.data, cfg.seed))
    assert info.value.key == "model.architectures.1.name"


# -- message and state layouts ------------------------------------------------------------------


def test_collected_rows_and_ragged_payloads():
    uniform = Collected([4, 1], torch.arange(6.0).reshape(2, 3), torch.ones(2))
    assert not uniform.ragged and torch.equal(uniform.of(1), torch.tensor([3.0, 4.0, 5.0]))
    rows = [torch.ones(2), torch.zeros(5)]
    ragged = Collected([3, 0], None, torch.ones(2), rows)
    assert ragged.ragged and ragged.payloads is None and ragged.of(0) is rows[1]
    with pytest.raises(ValueError):
        Collected([1, 2], None, torch.ones(2), rows[:1])


def _specs():
    return [{"a": 3, "b": 1}, {"a": 5, "b": 2}, {}]


def test_state_layout_split_join_read_round_trip():
    groups = np.array([0, 1, 2, 1, 0, 0, 1])
    layout = StateLayout(_specs(), groups)
    assert layout.row.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert set(layout.tables()) == {"group0/a", "group0/b", "group1/a", "group1/b"}
    assert layout.partition()["group_row"].tolist() == layout.row.tolist()
    clients = [6, 2, 0, 3, 4]
    sizes = layout.numels(clients)
    assert sizes.tolist() == [7, 0, 4, 7, 4]
    flat = np.arange(sizes.sum(), dtype=np.float32)
    parts = layout.split(clients, flat)
    rows, values = parts["group1/a"]  # clients 6 then 3: rows 2 and 1, first 5 floats of each
    assert rows.tolist() == [2, 1] and values.tolist() == [flat[0:5].tolist(), flat[11:16].tolist()]
    rows, values = parts["group0/b"]  # clients 0 then 4
    assert rows.tolist() == [0, 1] and values.tolist() == [[10.0], [21.0]]
    np.testing.assert_array_equal(layout.join(clients, {k: v for k, (_, v) in parts.items()}), flat)
    # reading back from whole tables (as resume does from the checkpoint) gives the same wire layout
    tables = {key: np.zeros((len(ids), numel), np.float32) for key, (numel, ids) in layout.tables().items()}
    for key, (r, v) in parts.items():
        tables[key][r] = v
    np.testing.assert_array_equal(layout.read(tables, clients), flat)


def test_state_layout_of_one_group_is_the_plain_layout():
    layout = StateLayout([{"personal": 2, "m": 1}], np.zeros(4, dtype=np.int64))
    assert layout.single and layout.partition() == {}
    assert {k: (n, ids.tolist()) for k, (n, ids) in layout.tables().items()} == {
        "personal": (2, [0, 1, 2, 3]),
        "m": (1, [0, 1, 2, 3]),
    }
    flat = np.arange(6, dtype=np.float32)
    parts = layout.split([3, 1], flat)
    assert parts["personal"][0].tolist() == [3, 1] and parts["personal"][1].tolist() == [[0, 1], [3, 4]]


def test_client_store_keeps_each_group_at_its_size():
    groups = np.array([0, 1, 2, 1, 0])
    init = {
        k: {n: torch.full((m,), float(10 * k + i)) for i, (n, m) in enumerate(_specs()[groups[k]].items())}
        for k in range(5)
    }
    store = ClientStore(_specs(), [4, 1, 2, 0], lambda k: init[k], groups)
    assert {n: v.shape[0] for n, v in store.views(1).items()} == {"a": 5, "b": 2}
    assert store.views(2) == {} and store.numel_of(4) == 4
    packed = store.pack_flat([1, 4, 2])
    assert packed.tolist() == [10.0] * 5 + [11.0] * 2 + [40.0] * 3 + [41.0]
    with pytest.raises(ValueError, match="pack_flat"):
        store.pack([1, 4])
    store.unpack([4, 1], np.arange(11, dtype=np.float32))
    assert store.views(4)["a"].tolist() == [0.0, 1.0, 2.0] and store.views(1)["b"].tolist() == [9.0, 10.0]
    assert store.views(0)["a"].tolist() == [0.0] * 3  # untouched


# -- runs -----------------------------------------------------------------------------------------


def test_two_architectures_in_one_run_train_as_local_training_does_per_group(tmp_path):
    """hetero_echo moves each client's model through the server and back: every client must end exactly as
    under ``local`` with its group's architecture, per-group state tables must hold those models, and the
    ragged tails must arrive whole (the server's label sum)."""
    cfg = _echo(tmp_path / "echo.h5", finetune_epochs=1)
    engine = _run(cfg)
    members = [np.arange(5), np.arange(5, 10)]
    with h5py.File(cfg.output_path) as f:
        np.testing.assert_array_equal(f["partition/group"][...], [0] * 5 + [1] * 5)
        np.testing.assert_array_equal(f["partition/group_row"][...], [0, 1, 2, 3, 4] * 2)
        assert set(f["clients/state"]) == {"round", "group0", "group1"}
        states = [f[f"clients/state/group{g}/model"][...] for g in range(2)]
    numels = [layout.numel for layout in engine.algo.layouts]
    assert numels[0] != numels[1]
    assert [s.shape for s in states] == [(3, 5, numels[0]), (3, 5, numels[1])]

    for g, spec in enumerate(("{name: mlp, hidden: [16]}", "{name: cnn2d, cnn2d_fc: [16]}")):
        alone = tiny_config(tmp_path / f"local{g}.h5", "local", state_every=1, finetune_epochs=1, model=spec)
        _run(alone)
        for name in ("train_loss", "test_acc", "test_loss", "finetune_test_acc"):
            np.testing.assert_allclose(
                read_clients(cfg.output_path, name)[:, members[g]],
                read_clients(alone.output_path, name)[:, members[g]],
                rtol=0,
                atol=1e-6,
                err_msg=name,
            )
        with h5py.File(alone.output_path) as f:
            alone_states = f["clients/state/model"][...]
        np.testing.assert_allclose(states[g], alone_states[:, members[g]], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(read_client_states(alone.output_path, "model", 1), alone_states[1])

    per_client = read_client_states(cfg.output_path, "model")  # the last snapshot, one array per client
    assert [len(v) for v in per_client] == [numels[0]] * 5 + [numels[1]] * 5
    for k, value in enumerate(per_client):
        np.testing.assert_array_equal(value, states[k // 5][-1, k % 5])

    data = load_federated(cfg.data, cfg.seed)
    sampled = read_clients(cfg.output_path, "participated").astype(bool)
    labels = [sum(int(data.client(k).y_train.sum()) for k in np.flatnonzero(row)) for row in sampled]
    np.testing.assert_array_equal(committed(cfg.output_path, "rounds", "label_sum"), labels)


@pytest.mark.parametrize("algorithm", ["hetero_echo", "fedproto"])
def test_resume_of_per_group_state_equals_a_straight_run(tmp_path, algorithm):
    def config(name, rounds):
        return _echo(tmp_path / f"{name}.h5", rounds=rounds, **{"algorithm.name": algorithm})

    straight = config("straight", 4)
    _run(straight)
    _run(config("resumed", 2))
    rest = config("resumed", 4)
    assert _run(rest, resume=True).start_round == 2
    for name in ("train_loss", "test_acc"):
        np.testing.assert_allclose(
            committed(rest.output_path, "rounds", name), committed(straight.output_path, "rounds", name), atol=1e-6
        )
    with h5py.File(straight.output_path) as a, h5py.File(rest.output_path) as b:
        for g in range(2):
            key = f"clients/state/group{g}/model"
            assert b[key].shape == a[key].shape == (4, 5, a[key].shape[2])
            np.testing.assert_allclose(b[key][...], a[key][...], rtol=0, atol=1e-6)
            slot = f"checkpoint/slot1/clients/group{g}/model"
            np.testing.assert_allclose(b[slot][...], a[slot][...], rtol=0, atol=1e-6)
        for name in a["checkpoint/slot1/server"]:
            np.testing.assert_allclose(
                b[f"checkpoint/slot1/server/{name}"][...], a[f"checkpoint/slot1/server/{name}"][...]
            )


def test_the_command_refuses_two_architectures_for_fedavg_in_one_line(tmp_path):
    out = tmp_path / "x.h5"
    run = pfl("run", "-n", "2", "--out", str(out), *TINY, "--set", f"model.architectures={TWO}")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "pfl-mpi: config error: model.architectures: 2 architectures, but fedavg needs one model for every client "
        "(it does not support heterogeneous clients)"
    ]
    assert not out.exists()
