"""The hand-written steps of Linear/ReLU chains (training/chain_sgd.py): which models they take, and that they end
where the sequential loop ends, like the autograd path of the batched loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pfl_mpi.models import build_model
from pfl_mpi.models.config import ModelConfig
from pfl_mpi.training import batched
from pfl_mpi.training.batched import batched_local_training
from pfl_mpi.training.chain_sgd import linear_chain
from pfl_mpi.training.loop import TrainConfig, local_training, make_optimizer
from pfl_mpi.training.stacked import probe, stack

SIZES, EPOCHS = [37, 20, 5, 64], [2, 1, 3, 1]  # ragged last batches, different numbers of steps


def _names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters()}


def test_the_chain_of_an_mlp_and_the_models_it_refuses():
    mlp = build_model(ModelConfig(name="mlp", hidden=[12, 8]).specs()[0], (6,), 4)
    assert linear_chain(mlp, _names(mlp), (6,)) == [
        ("linear", "base.fc1.weight", "base.fc1.bias"),
        ("relu", "", None),
        ("linear", "base.fc2.weight", "base.fc2.bias"),
        ("relu", "", None),
        ("linear", "head.fc3.weight", "head.fc3.bias"),
    ]
    cnn = build_model(ModelConfig(name="cnn2d").specs()[0], (1, 8, 8), 4)
    assert linear_chain(cnn, _names(cnn), (1, 8, 8)) is None  # convolutions
    shared = nn.Linear(5, 5)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    assert linear_chain(twice, _names(twice), (5,)) is None  # one Linear used twice
    assert probe(twice, torch.randn(3, 5)) is not None  # and the batched loop does not take it at all
    unflattened = nn.Sequential(nn.Linear(3, 4))
    assert linear_chain(unflattened, _names(unflattened), (2, 3)) is None  # a Linear over the last dim of matrices
    assert linear_chain(mlp, _names(mlp) - {"head.fc3.bias"}, (6,)) is None  # not every parameter trains


def _odd_chain() -> nn.Module:
    """Flatten of images, a Linear without bias, two ReLUs in a row, an Identity."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 9, bias=False), nn.ReLU(), nn.ReLU(), nn.Identity(), nn.Linear(9, 4)
    )


def _logreg() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name="logreg").specs()[0], (3, 2, 2), 4)


@pytest.mark.parametrize("make", [_odd_chain, _logreg], ids=["flatten-nobias-relus", "logreg"])
def test_chain_steps_end_where_the_sequential_loop_ends(make, monkeypatch):
    cfg = TrainConfig(batch_size=8, lr=0.2)
    model = make()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 3, 2, 2, generator=g), torch.randint(0, 4, (n,), generator=g)) for n in SIZES]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = []
    for i, (x, y) in enumerate(data):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
        gen = torch.Generator().manual_seed(100 + i)
        opt = make_optimizer(list(model.parameters()), cfg)
        loss = local_training(model, x, y, cfg, gen, epochs=EPOCHS[i], optimizer=opt)["train_loss"]
        expected.append(({n: p.detach().clone() for n, p in model.named_parameters()}, loss))

    def no_autograd(*args, **kwargs):
        raise AssertionError("the chain went through autograd")

    monkeypatch.setattr(batched, "_autograd_steps", no_autograd)
    stacked = stack([start] * len(data))
    gens = [torch.Generator().manual_seed(100 + i) for i in range(len(data))]
    means = batched_local_training(model, stacked, data, gens, cfg, cfg.lr, epochs=EPOCHS)
    for i, (params, loss) in enumerate(expected):
        for n, p in params.items():
            torch.testing.assert_close(stacked[n][i], p, rtol=1e-5, atol=1e-6, msg=n)
            assert not torch.equal(p, start[n])  # it did train
        assert means[i]["train_loss"] == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("make", [_odd_chain, _logreg], ids=["flatten-nobias-relus", "logreg"])
def test_a_clients_chain_result_does_not_depend_on_its_block(make):
    """Placement invariance: each client trained alone (K = 1) by the chain ends bit for bit where it ends in
    the block of all of them, its parameters and its train loss (the loss summed step by step, in one order)."""
    cfg = TrainConfig(batch_size=8, lr=0.2)
    model = make()
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(n, 3, 2, 2, generator=g), torch.randint(0, 4, (n,), generator=g)) for n in SIZES]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    block = stack([start] * len(data))
    gens = [torch.Generator().manual_seed(100 + i) for i in range(len(data))]
    together = batched_local_training(model, block, data, gens, cfg, cfg.lr, epochs=EPOCHS)
    for i in range(len(data)):
        alone = stack([start])
        gen = torch.Generator().manual_seed(100 + i)
        means = batched_local_training(model, alone, data[i : i + 1], [gen], cfg, cfg.lr, epochs=EPOCHS[i : i + 1])
        assert means[0]["train_loss"] == together[i]["train_loss"]
        for n in start:
            assert torch.equal(alone[n][0], block[n][i]), n
