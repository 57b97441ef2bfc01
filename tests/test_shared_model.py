"""SharedModel (the split, w, the server optimiser, its checkpoint keys) and Collected.weighted_mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pfl_mpi.algorithms.base import Client, Collected, Setup
from pfl_mpi.algorithms.server_opt import ServerOptConfig
from pfl_mpi.algorithms.shared_model import SharedModel
from pfl_mpi.data import ClientData
from pfl_mpi.training.loop import TrainConfig


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.base(x)))


def _setup() -> Setup:
    return Setup(Net(), torch.device("cpu"), TrainConfig(), num_clients=2, num_classes=2, seed=0, rounds=3)


def _client(state: dict[str, torch.Tensor]) -> Client:
    x = torch.zeros(2, 3)
    y = torch.zeros(2, dtype=torch.int64)
    return Client(0, 0, ClientData(x, y, x, y), state, torch.Generator().manual_seed(0))


def test_weighted_mean_of_rows_and_of_decoded_rows():
    rows = torch.tensor([[1.0, 2.0], [3.0, -4.0], [0.5, 0.25]])
    weights = torch.tensor([1.0, 3.0, 4.0])
    up = Collected([0, 1, 2], rows, weights)
    expected = (rows.double().numpy() * weights.double().numpy()[:, None]).sum(axis=0) / 8.0
    np.testing.assert_allclose(up.weighted_mean().numpy(), expected.astype(np.float32), rtol=1e-7)
    doubled = up.weighted_mean(lambda row: torch.cat([row, 2 * row]), 4)
    np.testing.assert_allclose(doubled.numpy(), np.concatenate([expected, 2 * expected]).astype(np.float32), rtol=1e-7)
    assert up.weighted_mean().dtype == torch.float32


def test_weighted_mean_is_zero_without_weight_and_needs_a_size_to_decode():
    up = Collected([0, 1], torch.ones(2, 3), torch.zeros(2))
    assert torch.equal(up.weighted_mean(), torch.zeros(3))
    assert torch.equal(up.weighted_mean(lambda row: row[:1], 1), torch.zeros(1))
    with pytest.raises(ValueError, match="give size"):
        up.weighted_mean(lambda row: row[:1])


def test_the_split_moves_the_shared_parameters_and_keeps_the_personal_ones():
    setup = _setup()
    shared = SharedModel(setup, lambda name: name.startswith("head."))
    assert shared.names == ("base.weight", "base.bias") and shared.numel == 16
    assert shared.state_spec() == {"personal": 10}
    state = shared.init_state()
    head = torch.cat([setup.model.head.weight.detach().reshape(-1), setup.model.head.bias.detach()])
    assert torch.equal(state["personal"], head)
    client = _client(state)
    w = torch.arange(16, dtype=torch.float32)

    def train(c: Client, shift: float) -> str:  # "training": every parameter moves by ``shift``
        assert c is client
        with torch.no_grad():
            for p in setup.model.parameters():
                p.add_(shift)
        return "trained"

    delta, result = shared.update(client, w, train, shift=0.5)
    assert result == "trained"
    assert torch.equal(delta, torch.full((16,), 0.5))  # w_k - w
    assert torch.equal(client.state["personal"], head + 0.5)  # the trained head, kept
    shared.load(client, torch.zeros(16))
    assert torch.equal(setup.model.base.bias.detach(), torch.zeros(4))
    assert torch.equal(setup.model.head.bias.detach(), head[-2:] + 0.5)


def test_server_steps_w_and_checkpoints_w_and_the_optimiser():
    setup = _setup()
    shared = SharedModel(setup)
    assert shared.state_spec() == {} and shared.init_state() == {}
    shared.init_server(ServerOptConfig(lr=0.5, momentum=0.9))
    w0 = torch.cat([p.detach().reshape(-1) for p in setup.model.parameters()])
    assert torch.equal(shared.w, w0) and shared.numel == 26
    mean = torch.linspace(-1, 1, 26)
    assert shared.step(mean) == {"update_norm": pytest.approx(float(mean.norm()))}
    torch.testing.assert_close(shared.w, w0 + 0.5 * mean, rtol=0, atol=1e-7)
    state = shared.server_state()
    assert set(state) == {"w", "opt"} and set(state["opt"]) == {"buf", "step"}
    assert set(shared.global_state()) == {"shared"}

    other = SharedModel(_setup())
    other.init_server(ServerOptConfig(lr=0.5, momentum=0.9))
    other.load_server_state({"w": state["w"].clone(), "opt": state["opt"]})
    shared.step(mean)
    other.step(mean)
    assert torch.equal(other.w, shared.w)  # resumed: the momentum buffer came back too

    plain = SharedModel(_setup())
    plain.init_server()  # no optimiser (e.g. FetchSGD's own step): w alone is the state
    assert set(plain.server_state()) == {"w"}
