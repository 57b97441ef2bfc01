"""Batched evaluation and fine-tuning (``train.client_batch`` > 1): blocks of clients are scored by batched
forwards and fine-tuned by one batched training, with the results of one client after another."""

from __future__ import annotations

from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.runtime import Engine
from pfl_mpi.runtime import evaluation as evaluation_module
from pfl_mpi.training import batched_eval, block_eval, stacked
from pfl_mpi.training.loop import evaluate

from .helpers import committed, tiny_config

CASES = {  # algorithm -> overrides: FedAvg and FedPer fine-tune; Ditto also scores its global model; Local its state
    "fedavg": {"train.momentum": 0.5},
    "fedper": {},
    "ditto": {"algorithm.lam": 0.5},
    "local": {},
}
EVAL_COLUMNS = ("test_loss", "test_acc", "finetune_test_loss", "finetune_test_acc")


def _cfg(out, algorithm: str, client_batch: int, **sets):
    base = {"rounds": 2, "finetune_epochs": 2, "data.partition": "dirichlet", "train.client_batch": client_batch}
    base["data.num_clients"] = 20  # 18 test rows each: scored in blocks on a CPU (block_eval.EVAL_CPU_ROWS)
    return tiny_config(out, algorithm, **{**base, **CASES.get(algorithm, {}), **sets})


def _run(cfg, resume: bool = False) -> Engine:
    engine = Engine(cfg, SerialWorld(), resume=resume, show_progress=False)
    assert engine.run() == 0
    return engine


def _columns(path, group: str = "clients") -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        names = [n for n in f[group] if n.startswith(("test_", "finetune_test_", "global_test_"))]
    return {n: committed(path, group, n) for n in names}


@pytest.fixture
def used(monkeypatch) -> dict[str, list[int]]:
    """The block sizes the batched evaluation and the batched fine-tuning ran (they are used, not a fallback)."""
    seen: dict[str, list[int]] = {"evaluate": [], "finetune": []}
    evaluate_k, train_k = block_eval.batched_evaluate, block_eval.batched_local_training

    def evaluating(model, params, data, *args, **kwargs):
        seen["evaluate"].append(len(data))
        return evaluate_k(model, params, data, *args, **kwargs)

    def training(model, params, data, *args, epochs=None, **kwargs):
        if epochs is not None and set(epochs) == {2}:  # the fine-tuning's epochs (training trains 1)
            seen["finetune"].append(len(data))
        return train_k(model, params, data, *args, epochs=epochs, **kwargs)

    monkeypatch.setattr(block_eval, "batched_evaluate", evaluating)
    monkeypatch.setattr(block_eval, "batched_local_training", training)
    return seen


def _mlp_and_cnn() -> list[tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    cnn = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    return [(mlp, (12,)), (cnn, (1, 6, 6))]


@pytest.mark.parametrize("which", [0, 1], ids=["mlp", "cnn"])
def test_batched_evaluate_equals_evaluate_per_client(which):
    """Ragged test sets (1 to 150 rows, over several chunks): accuracy exactly, loss to 1e-5; a client's scores do
    not depend on the clients beside it (bit for bit alone and in the block)."""
    model, shape = _mlp_and_cnn()[which]
    g = torch.Generator().manual_seed(1)
    sizes = [37, 150, 1, 64, 65]
    data = [(torch.randn(n, *shape, generator=g), torch.randint(0, 5, (n,), generator=g)) for n in sizes]
    names = [n for n, _ in model.named_parameters()]
    named = list(model.named_parameters())
    own = [{n: p.detach() + 0.3 * torch.randn(p.shape, generator=g) for n, p in named} for _ in sizes]
    params = stacked.stack(own)
    scores = batched_eval.batched_evaluate(model, params, data)
    for i, (x, y) in enumerate(data):
        with torch.no_grad():
            for n in names:
                model.get_parameter(n).copy_(own[i][n])
        loss, acc = evaluate(model, x, y)
        assert scores[i][1] == acc
        assert scores[i][0] == pytest.approx(loss, rel=1e-5)
        alone = batched_eval.batched_evaluate(model, {n: t[i : i + 1] for n, t in params.items()}, [data[i]])
        assert alone[0] == scores[i]


def test_on_a_cpu_large_test_splits_are_scored_alone(used):
    """evaluate_stack: the clients with at most EVAL_CPU_ROWS test rows go through batched forwards, the larger
    one through evaluate_client; each equals training.evaluate."""
    model, _ = _mlp_and_cnn()[0]
    g = torch.Generator().manual_seed(2)
    sizes = [10, block_eval.EVAL_CPU_ROWS + 1, 3]
    clients = [
        SimpleNamespace(test=(torch.randn(n, 12, generator=g), torch.randint(0, 5, (n,), generator=g))) for n in sizes
    ]
    named = list(model.named_parameters())
    own = [{n: p.detach() + 0.3 * torch.randn(p.shape, generator=g) for n, p in named} for _ in sizes]
    algo = SimpleNamespace(setup=SimpleNamespace(model=model), evaluate_client=lambda c: evaluate(model, *c.test))
    scores = block_eval.evaluate_stack(algo, clients, stacked.stack(own))
    assert used["evaluate"] == [2]
    for client, params, score in zip(clients, own, scores, strict=True):
        with torch.no_grad():
            for n, p in named:
                p.copy_(params[n])
        loss, acc = evaluate(model, *client.test)
        assert score[1] == acc and score[0] == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("algorithm", list(CASES))
def test_blocks_evaluate_and_finetune_as_one_client_after_another(tmp_path, algorithm, used, monkeypatch):
    """The same training (blocks of 4) evaluated in blocks and one by one: accuracies equal, losses to 1e-5."""
    _run(_cfg(tmp_path / "blocks.h5", algorithm, 4))
    assert max(used["evaluate"]) == 4
    if algorithm in ("fedavg", "fedper"):
        assert max(used["finetune"]) == 4
    monkeypatch.setattr(evaluation_module, "stacks_evaluation", lambda algo: False)
    used["evaluate"].clear()
    _run(_cfg(tmp_path / "one.h5", algorithm, 4))
    assert used["evaluate"] == []
    blocks, one = _columns(tmp_path / "blocks.h5"), _columns(tmp_path / "one.h5")
    assert set(blocks) == set(one) and set(EVAL_COLUMNS) <= set(one)
    if algorithm == "ditto":
        assert {"global_test_loss", "global_test_acc"} <= set(one)
    for name, value in one.items():
        if name.endswith("_acc"):
            np.testing.assert_array_equal(blocks[name], value, err_msg=name)
        else:
            np.testing.assert_allclose(blocks[name], value, rtol=1e-5, err_msg=name)
    assert not np.allclose(one["finetune_test_loss"][-1], one["test_loss"][-1])  # fine-tuning did train


@pytest.mark.parametrize("algorithm", ["fedavg", "fedper"])
def test_finetuned_metrics_equal_the_sequential_run(tmp_path, algorithm, used):
    """client_batch 4 (training, evaluation and fine-tuning batched) against client_batch 1: 1e-5 relative."""
    _run(_cfg(tmp_path / "one.h5", algorithm, 1))
    assert used == {"evaluate": [], "finetune": []}
    _run(_cfg(tmp_path / "four.h5", algorithm, 4))
    assert max(used["finetune"]) == 4
    for group in ("clients", "rounds"):
        one, four = _columns(tmp_path / "one.h5", group), _columns(tmp_path / "four.h5", group)
        assert set(EVAL_COLUMNS) <= set(one) == set(four)
        for name, value in one.items():
            np.testing.assert_allclose(four[name], value, rtol=1e-5, err_msg=f"{group}/{name}")


def test_what_the_batched_loop_cannot_train_finetunes_alone(tmp_path, used):
    """Adam: fine-tuning (and training) one client after another, the evaluation still batched; bit for bit the
    scores of the run with client_batch 1 for the accuracies."""
    adam = {"train.optimizer": "adam", "train.lr": 0.01, "train.momentum": 0.0}
    _run(_cfg(tmp_path / "one.h5", "fedavg", 1, **adam))
    _run(_cfg(tmp_path / "four.h5", "fedavg", 4, **adam))
    assert used["finetune"] == [] and max(used["evaluate"]) == 4
    one, four = _columns(tmp_path / "one.h5"), _columns(tmp_path / "four.h5")
    for name, value in one.items():
        np.testing.assert_allclose(four[name], value, rtol=1e-5, err_msg=name)
        if name.endswith("_acc"):
            np.testing.assert_array_equal(four[name], value, err_msg=name)


def test_an_algorithm_with_its_own_evaluation_is_evaluated_one_by_one(tmp_path, used):
    """FedProto scores by nearest prototype (its own evaluate_client): never the batched forward."""
    _run(tiny_config(tmp_path / "proto.h5", "fedproto", rounds=1, **{"train.client_batch": 4}))
    assert used["evaluate"] == []


def test_a_batched_run_with_finetuning_resumes_bit_for_bit(tmp_path):
    """Stopped after 2 rounds (fine-tuned then: its last round) and resumed to 3: every score equals the straight
    run's, the fine-tuned ones of round 3 included."""
    _run(_cfg(tmp_path / "straight.h5", "fedper", 3, rounds=3))
    _run(_cfg(tmp_path / "resumed.h5", "fedper", 3, rounds=2))
    assert _run(_cfg(tmp_path / "resumed.h5", "fedper", 3, rounds=3), resume=True).start_round == 2
    straight, resumed = _columns(tmp_path / "straight.h5"), _columns(tmp_path / "resumed.h5")
    assert set(EVAL_COLUMNS) <= set(straight) == set(resumed)
    for name, value in straight.items():
        rows = slice(-1, None) if name.startswith("finetune_") else slice(None)
        np.testing.assert_array_equal(resumed[name][rows], value[rows], err_msg=name)
