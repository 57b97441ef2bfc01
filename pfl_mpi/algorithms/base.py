"""The algorithm interface: an algorithm says what moves and what is computed; the runtime moves it.

An algorithm declares two message kinds and four computations:

- ``down``: :class:`Broadcast` (one payload for every client: MPI Bcast), :class:`PerClient`
  (one payload per client, only to the rank hosting it: Scatterv), or ``None``.
- ``up``: :class:`WeightedSum` (linear: each rank pre-sums ``weight * payload`` over its own
  clients, then one Reduce moves O(payload) bytes per rank), :class:`Gathered` (every client's
  payload reaches the server: Gatherv), or ``None``.
- ``downlink`` (server): the payload(s) for the clients of a round.
- ``client_update`` (worker): what a client does with its payload; returns what goes up.
- ``aggregate`` (server): how the server combines what came up.
- ``load_for_eval`` (worker): put into the model the parameters a client would use.

No method here ever calls MPI. Payloads are 1-D float32 CPU tensors whose sizes
(``down_numel``/``up_numel``) every rank knows without communication.

Client state is what persists between rounds on the worker hosting the client, and nothing
else: ``client_state_spec`` names flat float32 vectors and their sizes, the runtime stores
them row-wise, and ``Client.state`` hands the algorithm writable views of one client's rows
(update them in place, e.g. ``client.state["personal"].copy_(v)``). State may change only in
``client_update``, never in evaluation.

How the later algorithms fit (sketches):

- pFedHN: ``down = PerClient()``, ``up = Gathered()``. ``downlink`` runs the hypernetwork,
  theta_i = h(v_i; phi), for each sampled client and keeps the graph; a client loads theta_i,
  runs K steps and returns theta_i - theta_i~; ``aggregate`` receives every difference and
  calls ``torch.autograd.grad(theta_i, phi, grad_outputs=delta_i)`` per client, averages,
  clips and steps. phi never appears in a message. Evaluation scatters theta_i of every client.
- FedAMP: ``down = PerClient()`` (the personalised cloud model u_i), ``up = Gathered()`` (each
  client's trained w_i); ``aggregate`` computes the attention weights xi_ij from the gathered
  models and forms the u_i that the next round's ``downlink`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from ..data import ClientData
from .training import TrainConfig, sgd_epochs


@dataclass(frozen=True)
class Broadcast:
    """One payload for all clients (MPI Bcast)."""


@dataclass(frozen=True)
class PerClient:
    """One payload per client, sent only to the rank hosting it (MPI Scatterv)."""


@dataclass(frozen=True)
class WeightedSum:
    """Linear aggregation: sum of weight * payload, pre-summed per rank (MPI Reduce)."""


@dataclass(frozen=True)
class Gathered:
    """Every client's payload to the server (MPI Gatherv)."""


Down = Broadcast | PerClient
Up = WeightedSum | Gathered


@dataclass
class Setup:
    """What every rank knows when it builds the algorithm."""

    model: torch.nn.Module  # built once per rank, on ``device``; loaded per client
    device: torch.device
    train: TrainConfig
    num_clients: int
    num_classes: int
    seed: int
    params: list[torch.nn.Parameter] = field(init=False)  # model.parameters(), listed once
    # class frequencies over all clients' training data, known on every rank before round 1
    label_distribution: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.params = list(self.model.parameters())


@dataclass
class Client:
    """One client during one round, on the rank that hosts it."""

    id: int
    round: int
    data: ClientData  # on the rank's device
    state: dict[str, torch.Tensor]  # writable views of its persistent rows
    generator: torch.Generator  # derived from (seed, client, round): placement-independent

    @property
    def num_train(self) -> int:
        return int(self.data.y_train.shape[0])

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the training split."""
        return self.data.x_train, self.data.y_train

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the test split."""
        return self.data.x_test, self.data.y_test


@dataclass
class Update:
    """What one client sends up, with its aggregation weight and its metrics."""

    payload: torch.Tensor | None
    weight: float = 1.0
    metrics: dict[str, float] = field(default_factory=dict)  # must hold every name in client_metrics


@dataclass
class WeightedMean:
    """What the server gets from a WeightedSum uplink: sum(w_k p_k) / sum(w_k)."""

    mean: torch.Tensor
    total_weight: float
    count: int


@dataclass
class Collected:
    """What the server gets from a Gathered uplink: every client's payload, in ``clients`` order."""

    clients: list[int]
    payloads: torch.Tensor  # [len(clients), up_numel]
    weights: torch.Tensor  # [len(clients)]


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Algorithm:
    """Base class of every algorithm; see the module docstring for the contract."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    down: ClassVar[Down | None] = Broadcast()
    up: ClassVar[Up | None] = WeightedSum()
    client_metrics: ClassVar[tuple[str, ...]] = ("train_loss",)

    def __init__(self, params: BaseModel, setup: Setup):
        self.params = params
        self.setup = setup

    # -- sizes, known on every rank ------------------------------------------------------
    def down_numel(self) -> int:
        return 0

    def up_numel(self) -> int:
        return 0

    def client_state_spec(self) -> dict[str, int]:
        """Names and sizes of the flat vectors a client keeps between rounds."""
        return {}

    def init_client_state(self, client_id: int) -> dict[str, torch.Tensor]:
        """Initial value of a client's state (must depend on the seed and client only)."""
        return {}

    # -- server (rank 0) -----------------------------------------------------------------
    def init_server(self) -> None:
        """Build the server's state."""

    def downlink(self, round: int, clients: list[int]) -> torch.Tensor:
        """Broadcast: [down_numel]; PerClient: [len(clients), down_numel], in ``clients`` order."""
        raise NotImplementedError

    def aggregate(self, round: int, up: WeightedMean | Collected | None) -> dict[str, float]:
        """Update the server's state from what came up; return round metrics to record."""
        return {}

    def server_state(self) -> dict[str, torch.Tensor]:
        """Everything the server needs to resume exactly."""
        return {}

    def load_server_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``server_state`` returned."""

    def global_state(self) -> dict[str, torch.Tensor]:
        """The server's model(s), snapshotted into the run file."""
        return {}

    # -- client (a worker) ---------------------------------------------------------------
    def local_sgd(self, client: Client, **options) -> float:
        """SGD epochs of ``setup.model`` on the client's training split (see ``training.sgd_epochs``)."""
        options.setdefault("params", self.setup.params)
        return sgd_epochs(self.setup.model, *client.train, self.setup.train, client.generator, **options)

    def client_update(self, client: Client, payload: torch.Tensor | None) -> Update:
        raise NotImplementedError

    def load_for_eval(self, client: Client, payload: torch.Tensor | None) -> None:
        """Load into ``setup.model`` the parameters this client would use."""
        raise NotImplementedError
