"""Novel clients (data.novel_clients): held out of training, served after the last round by each algorithm's rule."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from pfl_mpi.algorithms import Client
from pfl_mpi.algorithms.novel_clients import NovelBudget, learn_novel_embedding
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.data import load_federated
from pfl_mpi.errors import ConfigError
from pfl_mpi.runtime import Engine
from pfl_mpi.runtime.build import build_algorithm
from pfl_mpi.runtime.placement import novel_clients, sample_clients, training_clients
from pfl_mpi.seeding import client_generator
from pfl_mpi.training.loop import evaluate

from .helpers import built_in_algorithms, flat, hand_sgd, names_of, tiny_config

NOVEL = {"data.novel_clients": 3, "clients_per_round": 4, "model.hidden": "[16, 12]"}


def _run(cfg, resume: bool = False) -> Engine:
    engine = Engine(cfg, SerialWorld(), resume=resume, show_progress=False)
    assert engine.run() == 0
    return engine


def _read(path, group: str, name: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[group][name][:]


def _load_flat(model: torch.nn.Module, names: list[str], values) -> None:
    with torch.no_grad():
        start = 0
        for name in names:
            p = model.get_parameter(name)
            p.copy_(torch.as_tensor(values[start : start + p.numel()]).view_as(p))
            start += p.numel()


# -- which clients are held out, and sampling ------------------------------------------------------------------
def test_novel_clients_follow_the_data_seed_and_are_never_sampled():
    a, b = novel_clients(5, 40, 6), novel_clients(5, 40, 6)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 6 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, novel_clients(6, 40, 6))
    pool = training_clients(40, a)
    assert len(pool) == 34 and not set(pool.tolist()) & set(a.tolist())
    for t in range(20):
        drawn = sample_clients(0, t, 40, 10, pool)
        assert len(drawn) == 10 and set(drawn.tolist()) <= set(pool.tolist())
        # a pool of every client draws what the unrestricted sampling draws
        assert np.array_equal(sample_clients(0, t, 40, 10, np.arange(40)), sample_clients(0, t, 40, 10))
    assert np.array_equal(sample_clients(0, 0, 40, 34, pool), pool)


def test_the_same_clients_are_held_out_whatever_the_training_seed(tmp_path):
    engines = [
        Engine(
            tiny_config(tmp_path / f"{s}.h5", seed=s, **{**NOVEL, "data.seed": 7}), SerialWorld(), show_progress=False
        )
        for s in (0, 1)
    ]
    assert np.array_equal(engines[0].novel, engines[1].novel) and len(engines[0].novel) == 3


@pytest.mark.parametrize(
    ("sets", "key", "words"),
    [
        ({"data.novel_clients": 1.5}, "data.novel_clients", "neither a count"),
        ({"data.novel_clients": 0.01}, "data.novel_clients", "rounds to 0"),
        ({"data.novel_clients": 10}, "data.novel_clients", "none trains"),
        ({"data.novel_clients": 4, "clients_per_round": 7}, "clients_per_round", "exceeds the 6 clients that train"),
        ({"data.novel_clients": 2, "algorithm.name": "fedamp"}, "data.novel_clients", "fedamp does not serve"),
        ({"data.novel_clients": 2, "novel.epochs": -1}, "novel.epochs", "greater than or equal to 0"),
        ({"data.novel_clients": 2, "novel.lr": 0}, "novel.lr", "greater than 0"),
    ],
)
def test_bad_novel_settings_are_refused_in_one_line(tmp_path, sets, key, words):
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path / "x.h5", **{"clients_per_round": 4, **sets})
    assert err.value.key == key and words in str(err.value) and "\n" not in str(err.value)


def test_a_fraction_holds_out_its_share(tmp_path):
    cfg = tiny_config(tmp_path / "x.h5", clients_per_round=4, **{"data.novel_clients": 0.25})
    assert cfg.data.novel_count(cfg.data.num_clients) == 2  # round(2.5): banker's rounding, 2
    assert len(Engine(cfg, SerialWorld(), show_progress=False).novel) == 2


# -- held-out clients never train ---------------------------------------------------------------------------------
def test_novel_clients_never_train_never_move_bytes_and_keep_their_state(tmp_path):
    cfg = tiny_config(tmp_path / "per.h5", "fedper", **{**NOVEL, "clients_per_round": 7, "state_every": 1})
    engine = _run(cfg)
    novel, trained = engine.novel, engine.training
    path = cfg.output_path
    participated = _read(path, "clients", "participated").astype(bool)
    assert not participated[:, novel].any() and participated[:, trained].all()  # every trainable one, every round
    for name in ("protocol_bytes_down", "protocol_bytes_up", "protocol_eval_bytes_down"):
        table = _read(path, "clients", name)
        assert (table[:, novel] == 0).all() and (table[:, trained] > 0).all(), name
    states = _read(path, "clients/state", "personal")  # every snapshot: the novel heads as initialised
    initial = engine.algo.shared.initial_personal.numpy()
    for k in novel:
        assert np.array_equal(states[:, k], np.broadcast_to(initial, states[:, k].shape))
    assert not np.array_equal(states[-1, trained[0]], initial)
    test_acc, novel_acc = _read(path, "clients", "test_acc"), _read(path, "clients", "novel_test_acc")
    assert np.isnan(test_acc[:, novel]).all() and np.isfinite(test_acc[:, trained]).all()
    assert np.isnan(novel_acc[:-1]).all() and np.isfinite(novel_acc[-1, novel]).all()
    assert np.isnan(np.delete(novel_acc[-1], novel)).all()
    rounds = {n: _read(path, "rounds", n) for n in ("novel_test_acc", "novel_test_acc_mean", "test_acc")}
    assert np.isnan(rounds["novel_test_acc"][:-1]).all()
    assert rounds["novel_test_acc_mean"][-1] == pytest.approx(novel_acc[-1, novel].mean())
    assert (_read(path, "clients", "protocol_novel_bytes_down")[-1, novel] == 4 * engine.algo.down_numel()).all()
    # the class frequencies that label_kl weighting compares with are those of the clients that train
    data = load_federated(cfg.data, cfg.seed)
    counts = sum(np.bincount(data.client(int(k)).y_train.numpy(), minlength=10) for k in trained)
    np.testing.assert_allclose(engine.algo.setup.label_distribution.numpy(), counts / counts.sum(), rtol=1e-6)


def test_the_simulated_network_selects_no_novel_client(tmp_path):
    sets = {**NOVEL, "network.enabled": "true", "network.over_selection": 0.5, "rounds": 4}
    engine = _run(tiny_config(tmp_path / "net.h5", **sets))
    status = _read(engine.cfg.output_path, "clients", "network_status")
    assert (status[:, engine.novel] == 0).all() and (status[:, engine.training] > 0).sum() == 4 * 6
    assert np.isfinite(_read(engine.cfg.output_path, "rounds", "novel_test_acc")[-1])


def test_without_novel_clients_nothing_changes(tmp_path):
    plain = _run(tiny_config(tmp_path / "a.h5", clients_per_round=4)).cfg.output_path
    zero = _run(tiny_config(tmp_path / "b.h5", clients_per_round=4, **{"data.novel_clients": 0})).cfg.output_path
    for name in ("train_loss", "test_acc"):
        assert np.array_equal(_read(plain, "rounds", name), _read(zero, "rounds", name))
    with h5py.File(zero) as f:
        assert "novel_test_acc" not in f["rounds"] and "novel_test_acc" not in f["clients"]


# -- each serving rule against an independent computation -------------------------------------------------------
@pytest.mark.parametrize("epochs", [0, 2])
def test_fedavg_serves_the_global_model_fine_tuned_for_the_budget(tmp_path, epochs):
    cfg = tiny_config(tmp_path / "avg.h5", **NOVEL, **{"novel.epochs": epochs, "novel.lr": 0.05})
    engine = _run(cfg)
    data, model = load_federated(cfg.data, cfg.seed), engine.algo.setup.model
    names = [n for n, _ in model.named_parameters()]
    w = _read(cfg.output_path, "global/state", "shared")[-1]
    served = _read(cfg.output_path, "clients", "novel_test_acc")[-1]
    for k in engine.novel:
        _load_flat(model, names, w)
        c = data.client(int(k))
        generator = client_generator(cfg.seed, int(k), cfg.rounds)
        hand_sgd(model, names, c.x_train, c.y_train, 0.05, cfg.train.batch_size, generator, epochs)
        assert served[k] == pytest.approx(evaluate(model, c.x_test, c.y_test)[1], abs=1e-6)


def test_fedper_fits_only_a_new_head_on_the_frozen_base(tmp_path):
    cfg = tiny_config(tmp_path / "per.h5", "fedper", **NOVEL, **{"novel.epochs": 2})
    engine = _run(cfg)
    algo, model = engine.algo, engine.algo.setup.model
    data = load_federated(cfg.data, cfg.seed)
    base, head = names_of(model, "base."), names_of(model, "head.")
    w = _read(cfg.output_path, "global/state", "shared")[-1]
    served = _read(cfg.output_path, "clients", "novel_test_acc")[-1]
    for k in (int(k) for k in engine.novel):
        c = data.client(k)
        # by hand: the base as the server has it, the initial head, SGD on the head alone
        _load_flat(model, base, w)
        _load_flat(model, head, algo.shared.initial_personal)
        hand_sgd(
            model,
            head,
            c.x_train,
            c.y_train,
            cfg.train.lr,
            cfg.train.batch_size,
            client_generator(cfg.seed, k, cfg.rounds),
            2,
        )
        expected_head = flat(model, head)
        assert served[k] == pytest.approx(evaluate(model, c.x_test, c.y_test)[1], abs=1e-6)
        # the rule itself: after serve_novel the base is w unchanged and only the head moved
        client = Client(k, cfg.rounds, c, algo.initial_client_state(k), client_generator(cfg.seed, k, cfg.rounds))
        algo.serve_novel(client, torch.from_numpy(w), NovelBudget(epochs=2, steps=0, lr=None))
        assert torch.equal(flat(model, base), torch.from_numpy(w))
        torch.testing.assert_close(flat(model, head), expected_head)
        assert not torch.equal(flat(model, head), algo.shared.initial_personal)
        assert torch.equal(client.state["personal"], algo.shared.initial_personal)  # its state untouched


def test_local_trains_a_novel_client_from_scratch(tmp_path):
    cfg = tiny_config(tmp_path / "loc.h5", "local", **NOVEL, **{"novel.epochs": 2})
    engine = _run(cfg)
    model, data = engine.algo.setup.model, load_federated(cfg.data, cfg.seed)
    names = [n for n, _ in model.named_parameters()]
    served = _read(cfg.output_path, "clients", "novel_test_acc")[-1]
    for k in (int(k) for k in engine.novel):
        _load_flat(model, names, engine.algo.initial)
        c = data.client(k)
        hand_sgd(
            model,
            names,
            c.x_train,
            c.y_train,
            cfg.train.lr,
            cfg.train.batch_size,
            client_generator(cfg.seed, k, cfg.rounds),
            2,
        )
        assert served[k] == pytest.approx(evaluate(model, c.x_test, c.y_test)[1], abs=1e-6)


@pytest.mark.parametrize("name", ["pfedhn", "pfedhn-pc"])
def test_pfedhn_serving_equals_learn_novel_embedding(tmp_path, name):
    fast = {"algorithm.inner_steps": 3, "algorithm.lr": 0.05, "novel.steps": 4, "novel.lr": 0.5}
    cfg = tiny_config(tmp_path / "hn.h5", name, **NOVEL, **fast)
    engine = _run(cfg)
    algo, data = engine.algo, load_federated(cfg.data, cfg.seed)
    phi = algo.phi_layout.flatten(algo.hnet).clone()
    loss = _read(cfg.output_path, "clients", "novel_test_loss")[-1]
    acc = _read(cfg.output_path, "clients", "novel_test_acc")[-1]
    bytes_up = _read(cfg.output_path, "clients", "protocol_novel_bytes_up")[-1]
    for k in (int(k) for k in engine.novel):
        client = Client(
            k, cfg.rounds, data.client(k), algo.initial_client_state(k), client_generator(cfg.seed, k, cfg.rounds)
        )
        v, _ = learn_novel_embedding(algo, client, steps=4, lr=0.5, trained=engine.training.tolist())
        with torch.no_grad():
            algo.load_for_eval(client, algo.hnet.generate(v[None])[0])
        expected = evaluate(algo.setup.model, *client.test)
        assert loss[k] == pytest.approx(expected[0], rel=1e-4) and acc[k] == pytest.approx(expected[1], abs=1e-6)
        assert bytes_up[k] == 4 * 4 * algo.up_numel()  # four deltas of float32
    assert torch.equal(algo.phi_layout.flatten(algo.hnet), phi)  # serving moved no part of phi


# -- resume -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fedper", "pfedhn-pc"])
def test_resume_serves_novel_clients_as_a_straight_run(tmp_path, name):
    fast = {"algorithm.inner_steps": 3, "novel.steps": 3} if name.startswith("pfedhn") else {}

    def run(path, rounds, resume=False):
        return _run(tiny_config(tmp_path / path, name, rounds=rounds, **NOVEL, **fast), resume).cfg.output_path

    straight = run("straight.h5", 4)
    run("resumed.h5", 2)
    resumed = run("resumed.h5", 4, resume=True)
    for name in ("novel_test_acc", "novel_test_loss", "test_acc", "train_loss"):
        assert np.array_equal(
            _read(resumed, "rounds", name)[2:], _read(straight, "rounds", name)[2:], equal_nan=True
        ), name
    for name in ("novel_test_acc", "protocol_novel_bytes_down"):
        assert np.array_equal(
            _read(resumed, "clients", name)[-1], _read(straight, "clients", name)[-1], equal_nan=True
        ), name


def test_novel_clients_are_scored_on_every_split_of_eval_on(tmp_path):
    sets = {**NOVEL, "data.val_fraction": 0.25, "novel.epochs": 1}
    both = _run(tiny_config(tmp_path / "both.h5", **sets, **{"data.eval_on": "[val, test]"})).cfg.output_path
    test = _run(tiny_config(tmp_path / "test.h5", **sets)).cfg.output_path
    for name in ("novel_test_acc", "novel_test_loss"):  # scoring val beside test changes nothing of test
        assert np.array_equal(_read(both, "clients", name), _read(test, "clients", name), equal_nan=True)
    val = _read(both, "clients", "novel_val_acc")[-1]
    assert np.isfinite(val).sum() == 3 and np.isfinite(_read(both, "rounds", "novel_val_acc")[-1])
    with h5py.File(test) as f:
        assert "novel_val_acc" not in f["rounds"]


# -- what the user sees -------------------------------------------------------------------------------------------
def test_summary_info_and_report_show_the_novel_clients(tmp_path, capsys):
    from pfl_mpi.cli import main
    from pfl_mpi.report.load import load_run
    from pfl_mpi.report.tables import comparison_table, summarise

    out = tmp_path / "cli.h5"
    sets = {"rounds": 2, "data.num_clients": 10, "data.partition": "shards", "model.hidden": "[16]", **NOVEL}
    assert main(["run", *(f"--set={k}={v}" for k, v in sets.items()), "--out", str(out)]) == 0
    acc, mean, std = (
        _read(out, "rounds", n)[-1] for n in ("novel_test_acc", "novel_test_acc_mean", "novel_test_acc_std")
    )
    line = f"  novel clients, served after round 2: test acc {acc:.4f} (client mean {mean:.4f} +- {std:.4f})"
    assert line in capsys.readouterr().out.splitlines()  # the run's summary
    assert main(["info", str(out)]) == 0
    assert line in capsys.readouterr().out.splitlines()
    run = load_run(out)
    row = summarise(run)
    assert row["novel_acc"] == acc and row["novel_client_mean"] == mean
    header = comparison_table([run]).splitlines()[0]
    assert "| novel test acc | novel client mean acc |" in header
    assert "novel test acc" not in comparison_table([load_run(_run(tiny_config(tmp_path / "p.h5")).cfg.output_path)])


def test_every_algorithm_serves_novel_clients_or_refuses_them(tmp_path):
    """Each algorithm refuses novel clients in one line, or serves one: its evaluation payload, ``serve_novel``
    (pFedHN: ``novel_fit``, run end to end above) and a finite score, the client's state untouched."""
    from pfl_mpi.algorithms.registry import _REGISTRY

    served = []
    for name in built_in_algorithms():
        if not _REGISTRY[name].serves_novel:
            with pytest.raises(ConfigError, match=f"data.novel_clients: {name} does not serve novel clients"):
                tiny_config(tmp_path / f"{name}.h5", name, **NOVEL)
            continue
        cfg = tiny_config(tmp_path / f"{name}.h5", name, **NOVEL)
        data = load_federated(cfg.data, cfg.seed)
        algo = build_algorithm(cfg, data)
        algo.init_server()
        if algo.novel_fit([9], list(range(9)), NovelBudget(1, 1, None)) is None:
            payload = algo.downlink(0, [9], "eval") if algo.eval_down is not None else None
            payload = payload[0] if payload is not None and payload.dim() == 2 else payload
            state = algo.initial_client_state(9)
            client = Client(9, 1, data.client(9), {k: v.clone() for k, v in state.items()}, client_generator(0, 9, 1))
            algo.serve_novel(client, payload, NovelBudget(epochs=1, steps=1, lr=None))
            assert np.isfinite(algo.evaluate_client(client)[:2]).all(), name
            assert all(torch.equal(client.state[k], v) for k, v in state.items()), name
        served.append(name)
    assert {"fedavg", "fedper", "fedrep", "lgfedavg", "ditto", "perfedavg", "local", "pfedhn", "pfedhn-pc"} <= set(
        served
    )
