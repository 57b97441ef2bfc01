"""Tasks and losses: next-token and regression metrics against hand computations, the names the record gives
them, a user loss in the client loop, and one-line refusals of the new keys before MPI starts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pfl_mpi.algorithms import Client
from pfl_mpi.comm import FIELDS, LABELS
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.data import load_federated
from pfl_mpi.models import build_model
from pfl_mpi.report import tables
from pfl_mpi.report.load import load_run
from pfl_mpi.runtime import Engine
from pfl_mpi.runtime.record import EVAL_COLUMNS, META_COLUMNS, RANK_FIELDS, extra_columns, summarise
from pfl_mpi.seeding import client_generator
from pfl_mpi.training.loop import Batch, cross_entropy, evaluate
from pfl_mpi.training.tasks import (
    TASKS,
    evaluate_regression,
    evaluate_tokens,
    resolve_task,
    squared_error,
    token_cross_entropy,
)
from tests.helpers import build_algorithm, committed, last_global_state, tiny_config
from tests.plugins import user_losses
from tests.test_cli import _MPI_PREFIXES, TINY


class PerPosition(torch.nn.Module):
    """Token ids [B, T] -> logits [B, T, V] (one prediction per position)."""

    def __init__(self, vocab: int = 7):
        super().__init__()
        self.embed, self.out = torch.nn.Embedding(vocab, 5), torch.nn.Linear(5, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(x)))


def test_token_metrics_are_means_over_every_token():
    torch.manual_seed(0)
    model, x, y = PerPosition(), torch.randint(0, 7, (9, 6)), torch.randint(0, 7, (9, 6))
    loss, acc = evaluate_tokens(model, x, y, batch_size=4)
    logits = model(x)
    by_hand = [-torch.log_softmax(logits[b, t], 0)[y[b, t]].item() for b in range(9) for t in range(6)]
    hits = [int(logits[b, t].argmax() == y[b, t]) for b in range(9) for t in range(6)]
    assert loss == pytest.approx(sum(by_hand) / 54, rel=1e-6) and acc == sum(hits) / 54
    objective, metrics = token_cross_entropy(model.train(), Batch(x, y, torch.arange(9), 0))
    assert objective.item() == pytest.approx(sum(by_hand) / 54, rel=1e-6) and metrics["train_loss"] is objective


def test_next_token_with_one_prediction_per_sequence_is_classification_exactly():
    """LEAF's Shakespeare: [B, V] logits for the next character; the token metrics equal classification's."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 4), torch.nn.Flatten(), torch.nn.Linear(4 * 5, 11))
    x, y = torch.randint(0, 11, (20, 5)), torch.randint(0, 11, (20,))
    assert evaluate_tokens(model, x, y, 8) == evaluate(model, x, y, 8)
    batch = Batch(x, y, torch.arange(20), 0)
    assert torch.equal(token_cross_entropy(model, batch)[0], cross_entropy(model, batch)[0])


@pytest.mark.parametrize("targets", [(13,), (13, 2)])
def test_regression_metrics_are_mse_and_its_root(targets):
    torch.manual_seed(2)
    model = torch.nn.Linear(3, targets[-1] if len(targets) > 1 else 1)
    x, y = torch.randn(13, 3), torch.randn(*targets)
    mse, rmse = evaluate_regression(model, x, y, batch_size=5)
    out = model(x).detach().numpy().reshape(y.shape)
    expected = float(np.mean((out.astype(np.float64) - y.numpy()) ** 2))
    assert mse == pytest.approx(expected, rel=1e-6) and rmse == pytest.approx(math.sqrt(expected), rel=1e-6)
    objective, _ = squared_error(model, Batch(x, y, torch.arange(13), 0))
    assert objective.item() == pytest.approx(expected, rel=1e-5)


def test_task_auto_follows_the_data_set_and_an_explicit_task_wins():
    assert resolve_task("auto", "shakespeare").name == "next_token"
    assert resolve_task("auto", "digits").name == "classification"
    assert resolve_task("regression", "digits").name == "regression"
    assert tiny_config("x.h5").task == "auto"


def _summarise(task, evaluated, extra=()):
    ledgers = np.zeros((2, len(LABELS) * len(FIELDS) + len(RANK_FIELDS)))
    rows = np.array([[0, 1.0, 10, 0.5], [1, 1.0, 30, 0.7]])  # client, weight, num_train, train_loss
    assert rows.shape[1] == len(META_COLUMNS) + 1
    columns = ("client", "num_test", *task.columns(), *extra)  # record.eval_columns of the test split
    return summarise(0, 3, ("train_loss",), rows, (evaluated, columns), ledgers, [0, 1], task)


def test_the_record_names_regression_metrics_mse_and_rmse():
    task = TASKS["regression"]
    extra = extra_columns(task, True, False)
    assert extra == ("finetune_test_mse", "finetune_test_rmse")
    rows = np.array([[0, 10, 4.0, 2.0, 1.0, 1.0], [2, 30, 1.0, 1.0, 0.25, 0.5]])  # client, n, mse, rmse, ft...
    assert rows.shape[1] == len(EVAL_COLUMNS) + len(extra)
    scalars, clients, _, _ = _summarise(task, rows, extra)
    pooled = (10 * 4.0 + 30 * 1.0) / 40
    assert scalars["test_mse"] == pooled and scalars["test_rmse"] == math.sqrt(pooled)  # root of the pooled MSE
    assert scalars["test_rmse_mean"] == 1.5 and scalars["test_rmse_std"] == 0.5
    assert scalars["finetune_test_rmse"] == math.sqrt((10 * 1.0 + 30 * 0.25) / 40)
    assert "test_acc" not in scalars and "test_loss" not in scalars and "test_acc" not in clients
    np.testing.assert_array_equal(clients["test_mse"], [4.0, np.nan, 1.0])


def test_the_record_of_classification_is_the_weighted_accuracy():
    scalars, clients, _, _ = _summarise(TASKS["classification"], np.array([[0, 10, 1.0, 0.5], [1, 30, 2.0, 0.9]]))
    assert scalars["test_acc"] == (10 * 0.5 + 30 * 0.9) / 40 and scalars["test_loss"] == (10 + 60) / 40
    assert scalars["test_acc_mean"] == 0.7 and "test_rmse" not in scalars


def _update(cfg, client_id=3):
    algo, data, w0 = build_algorithm(cfg)
    client = Client(client_id, 0, data.client(client_id), {}, client_generator(cfg.seed, client_id, 0))
    return algo.client_update(client, w0.clone())


def test_a_user_loss_trains_the_clients(tmp_path):
    """train.loss replaces the objective: torch's own cross-entropy gives the default update bit for bit, a
    label-smoothed one (called with the model's outputs and the targets) another update."""
    plain = _update(tiny_config(tmp_path / "a.h5"))
    same = _update(tiny_config(tmp_path / "b.h5", **{"train.loss": "torch.nn.functional:cross_entropy"}))
    assert torch.equal(plain.payload, same.payload) and plain.metrics == same.metrics
    user_losses.CALLS.clear()
    smoothed = _update(tiny_config(tmp_path / "c.h5", **{"train.loss": "tests.plugins.user_losses:smoothed"}))
    assert not torch.equal(plain.payload, smoothed.payload)
    assert user_losses.CALLS and all(o[0] == t[0] and len(o) == 2 and len(t) == 1 for o, t in user_losses.CALLS)
    assert smoothed.metrics["train_loss"] > plain.metrics["train_loss"]  # smoothing keeps the loss above CE's


def test_an_algorithm_that_passes_its_own_loss_under_a_user_loss_fails_loudly(tmp_path):
    algo, data, _ = build_algorithm(
        tiny_config(tmp_path / "a.h5", **{"train.loss": "tests.plugins.user_losses:smoothed"})
    )
    client = Client(3, 0, data.client(3), {}, client_generator(0, 3, 0))
    with pytest.raises(RuntimeError, match="own_loss"):
        algo.local_training(client, loss=cross_entropy)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith(_MPI_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    "sets,key",
    [
        (["task=ranking"], "task"),
        (["train.loss=cross_entropy"], "train.loss"),
        (["train.loss=no_such_module_xyz:f"], "train.loss"),
        (["train.loss=tests.plugins.user_losses:missing"], "train.loss"),
        (["train.loss=tests.plugins.user_losses:NOT_A_FUNCTION"], "train.loss"),
        (["train.loss=tests.plugins.user_losses:one_argument"], "train.loss"),
        (["train.loss=tests.plugins.user_losses:unreduced"], "train.loss: must return a scalar"),
        (["train.loss=tests.plugins.user_losses:wrong_targets"], "train.loss: failed on two samples of client 0"),
        (["algorithm.name=fedproto", "train.loss=torch.nn.functional:cross_entropy"], "train.loss"),
        (["algorithm.name=fedmd", "task=regression"], "task"),
        (["train.optimizer_state=kept"], "train.optimizer_state"),
        (["algorithm.name=pfedhn", "train.optimizer_state=keep"], "train.optimizer_state"),
        (["train.client_batch=4", "task=regression"], "train.client_batch"),
        # what Per-FedAvg, FedMeta and pFedHN's inner loop would ignore
        (["algorithm.name=perfedavg", "train.loss=torch.nn.functional:cross_entropy"], "train.loss"),
        (["algorithm.name=fedmeta", "train.optimizer_state=keep"], "train.optimizer_state"),
        (["algorithm.name=pfedhn", "train.eps=1e-6"], "train: train.eps applies to adam"),
        (["train.betas=[0.8, 0.99]"], "train: train.betas applies to adam"),
    ],
)
def test_new_keys_are_refused_with_exit_2_and_one_line(in_tmp, capsys, sets, key):
    from pfl_mpi.cli import main

    args = ["run", "tiny.yaml"] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"pfl-mpi: config error: {key}"), err
    assert not (in_tmp / "runs").exists()


def test_a_regression_run_records_mse_and_rmse_of_its_global_model(tmp_path):
    """task: regression on digits: a one-output network regresses the label as a number; the file records
    test_mse (the global model's squared error over every client's test samples, recomputed here) and
    test_rmse, no accuracy; the report's tables read them."""
    cfg = tiny_config(tmp_path / "reg.h5", **{"task": "regression", "train.lr": 0.01, "state_every": 1})
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    data = load_federated(cfg.data, cfg.seed)
    model = build_model(cfg.model, data.input_shape, 1)
    torch.nn.utils.vector_to_parameters(torch.from_numpy(last_global_state(cfg.output_path)), model.parameters())
    squared, n = 0.0, 0
    with torch.no_grad():
        for k in range(data.num_clients):
            c = data.client(k)
            squared += float(((model(c.x_test).reshape(-1).double() - c.y_test.double()) ** 2).sum())
            n += c.y_test.numel()
    mse, rmse = committed(cfg.output_path, "rounds", "test_mse"), committed(cfg.output_path, "rounds", "test_rmse")
    assert mse[-1] == pytest.approx(squared / n, rel=1e-5) and rmse[-1] == pytest.approx(math.sqrt(mse[-1]), rel=1e-12)
    run = load_run(cfg.output_path)
    assert "test_acc" not in run.rounds and "test_loss" not in run.rounds and run.score == "test_rmse"
    assert tables.summarise(run)["final_acc"] == rmse[-1] and "final test rmse" in tables.comparison_table([run])
