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

No method here ever calls MPI: payloads are 1-D CPU tensors whose sizes (``down_numel``/``up_numel``)
every rank knows without communication, in the ``dtype`` of their message kind (default float32).

Wire dtypes: every message kind takes ``dtype`` (one of :data:`WIRE_DTYPES`), and the payload
moves in exactly that dtype: ``numel * itemsize`` bytes per payload, which is what the ledger
records. ``Broadcast``/``PerClient``/``Gathered`` move the bytes as they are, so a payload can be
int8 signs, float16 values, or a uint8 byte string packed by the algorithm (see ``pack``/``unpack``
below: e.g. int32 indices followed by float32 values). A payload of a non-float32 message must
already have the declared dtype (the runtime refuses to cast it: a silent cast would truncate);
float32 messages accept any float payload and convert it, as before.

``WeightedSum(dtype)``: each rank sums ``weight * payload`` over its clients in float64 (integer
dtypes need integer weights, so the sum is exact), casts it to ``dtype`` and one Reduce adds the
ranks' sums in ``dtype``. With float32 the summed weight rides in one extra float32 slot of the
same buffer (``up_numel + 1`` floats, as always). With any other dtype the weight cannot share
the buffer (an int8 slot would overflow, a float16 one would round), so a second Reduce, also
labelled ``up``, carries two float64: the summed weight, exact, and the overflow bound
sum_k |weight_k| * max_i |payload_k,i|. The server checks that bound against the dtype's largest
value (every partial sum in the Reduce tree is below it, so an integer sum cannot have wrapped)
and raises OverflowError otherwise; a worker checks its own partial sum before sending.
Bytes up per worker: ``itemsize * up_numel + 16``. The server gets ``WeightedMean.sum`` (the
summed payload, in ``dtype``) next to ``mean`` (float32, sum / weight).

Client state is what persists between rounds on the worker hosting the client, and nothing
else: ``client_state_spec`` names flat float32 vectors and their sizes, the runtime stores
them row-wise, and ``Client.state`` hands the algorithm writable views of one client's rows
(update them in place, e.g. ``client.state["personal"].copy_(v)``). State may change only in
``client_update``, never in evaluation. With ``train.optimizer_state: keep`` the base class adds one more
vector, ``optimizer_state`` (``state_specs``, ``initial_client_state``): the client's optimiser state, loaded
and stored around every ``local_training`` call that uses the train section's optimiser (``KeptState``).

Tasks: ``setup.task`` (config ``task``) gives the default training loss (``setup.loss``, or the user's
``train.loss``) that ``local_training`` uses when an algorithm passes none, and the evaluation
(``evaluate_client``: the task's two metrics). An algorithm that passes a cross-entropy of its own declares
``own_loss = True``.

Heterogeneous clients (``heterogeneous = True``; config ``model.architectures``): clients fall into
architecture groups, every rank builds one model per group (``Setup.models``, ``models[0] is model``)
and knows every client's group (``Setup.groups``, ``group_of``); ``model_for(k)``/``params_for(k)``
give client k's. An algorithm that is not heterogeneous is refused with more than one group.

- Sizes per client: ``down_numel_of(k)`` (PerClient) and ``up_numel_of(k)`` (Gathered) may differ
  between clients (by group, or e.g. by training samples); every rank computes them. The runtime sizes
  Scatterv/Gatherv from them and never pads: the ledger counts exactly the declared payloads.
  A PerClient ``downlink`` returns ``[len(clients), down_numel]`` when sizes agree, or a list of 1-D
  payloads (one per client, in ``clients`` order) in any case. A Gathered uplink arrives as
  :class:`Collected`: ``rows`` always (one 1-D payload per client), ``payloads`` 2-D only when every
  client of the round sent the same size (else None).
- State per group: ``client_state_spec(group)`` may depend on the group (it is called without the
  argument when there is one group, so ``def client_state_spec(self)`` keeps working);
  ``init_client_state(k)`` returns the state of k's group.
- Checks that need the built models (e.g. FedProto's equal embedding sizes): ``check_models``, run
  before MPI starts (``pfl-mpi run``) and when the runtime builds the algorithm.
- Evaluation calls ``load_for_eval`` then ``evaluate_client`` (default: the test loss and accuracy of
  ``model_for(k)``); override ``evaluate_client`` for another inference rule.

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

import dataclasses
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from ..data import ClientData
from ..data.public import PublicData
from ..training.loop import Augment, LossFn, Means, TrainConfig, cross_entropy, local_training, make_optimizer
from ..training.optimizers import KeptState
from ..training.tasks import CLASSIFICATION, Task
from ..wire import (
    Broadcast,
    Collected,
    Down,
    Gathered,
    PerClient,
    Phase,
    Up,
    WeightedMean,
    WeightedSum,
    pack,
    packed_size,
    unpack,
)

if TYPE_CHECKING:
    from .novel_clients import NovelBudget

__all__ = [  # the message declarations and payload helpers, for algorithm files to import from here
    "Broadcast",
    "Collected",
    "Gathered",
    "PerClient",
    "Phase",
    "WeightedMean",
    "WeightedSum",
    "pack",
    "packed_size",
    "unpack",
]


@dataclass
class Setup:
    """What every rank knows when it builds the algorithm."""

    model: torch.nn.Module  # built once per rank, on ``device``; loaded per client
    device: torch.device
    train: TrainConfig
    num_clients: int
    num_classes: int
    seed: int
    # heterogeneous clients: one model per architecture group (``models[0] is model``) and the group
    # of every client, known on every rank from the config; by default one group holding every client
    models: list[torch.nn.Module] = field(default_factory=list)
    groups: np.ndarray | None = None  # int [num_clients]
    # training samples of every client, int [num_clients], known on every rank (per-client payload sizes)
    train_sizes: np.ndarray | None = None
    test_sizes: np.ndarray | None = None  # test samples of every client (what ``client.test`` holds), int [num_clients]
    public: PublicData | None = None  # the data set shared by every client (data.public), if any
    augment: Augment | None = None  # per-batch transform of training inputs (data augmentation), if any
    rounds: int = 1  # the run's planned rounds (learning-rate schedules over rounds)
    task: Task = CLASSIFICATION  # the clients' default loss and the evaluation's metrics (config ``task``)
    loss: LossFn | None = None  # the clients' training objective (``train.loss``); None: the task's loss
    client_batch: int = 1  # clients trained together (train.client_batch resolved: client_batch.choose_client_batch)
    params: list[torch.nn.Parameter] = field(init=False)  # model.parameters(), listed once
    # class frequencies over all clients' training data, known on every rank before round 1
    label_distribution: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.models = self.models or [self.model]
        if self.models[0] is not self.model:
            raise ValueError("Setup: models[0] must be model")
        if self.groups is None:
            self.groups = np.zeros(self.num_clients, dtype=np.int64)
        self.params = list(self.model.parameters())
        self.loss = self.loss or self.task.loss
        self._group_params = [self.params, *(list(m.parameters()) for m in self.models[1:])]

    @property
    def num_groups(self) -> int:
        return len(self.models)

    def group_of(self, client: int) -> int:
        """The architecture group of ``client``."""
        return int(self.groups[client])

    def model_for(self, client: int) -> torch.nn.Module:
        """The model (built once per rank) of ``client``'s architecture group."""
        return self.models[self.group_of(client)]

    def params_for(self, client: int) -> list[torch.nn.Parameter]:
        """``model_for(client).parameters()``, listed once."""
        return self.group_params(self.group_of(client))

    def group_params(self, group: int) -> list[torch.nn.Parameter]:
        """``models[group].parameters()``, listed once."""
        return self._group_params[group]


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


OPTIMIZER_STATE = "optimizer_state"  # the client-state name of the kept optimiser state


class NoParams(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")


class Algorithm:
    """Base class of every algorithm; see the module docstring for the contract."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    # hyper-parameters to tune on validation (``pfl-mpi sweep --tune``): config key -> values, every algorithm
    # TUNING_TRIALS points in all (docs/tuning.md); default: the clients' learning rate
    tuning_grid: ClassVar[dict[str, list]] = {"train.lr": [0.03, 0.1, 0.3, 1.0]}
    # What the algorithm is, declared in one way: attributes, read from the instance (a class sets them, an
    # ``__init__`` may override one that depends on the setup, e.g. signSGD's vote dtype).
    down: Down | None = Broadcast()  # the training downlink
    up: Up | None = WeightedSum()  # the uplink
    # the evaluation downlink (``downlink(..., "eval")``, sizes as ``down``'s), or None: evaluation sends nothing
    # down, the clients evaluate what their state holds and ``load_for_eval`` gets None
    eval_down: Down | None = None
    client_metrics: tuple[str, ...] = ("train_loss",)
    # whether clients may have different architectures (``Setup.models``, ``Setup.model_for``)
    heterogeneous: bool = False
    # whether a global model beside the personal ones is evaluated too (``load_global_for_eval``)
    evaluates_global: bool = False
    # names of further (loss, score) pairs that ``evaluate_client`` returns after its own two, recorded as
    # evaluation metrics like test_loss and test_acc (FedProto: its clients' own heads beside the nearest prototype)
    eval_metrics: tuple[str, ...] = ()
    # ``train`` keys the algorithm does not use, each with the key that applies instead (a non-default value of
    # one of them is refused before any rank starts)
    replaces_train: dict[str, str] = {}
    # trains with a cross-entropy of its own instead of ``setup.loss``: refuses a regression task and train.loss
    own_loss: bool = False
    # serves a client that never trained (``data.novel_clients``) after the last round, by ``serve_novel`` or
    # ``novel_fit`` (docs/novel_clients.md); an algorithm that does not is refused with novel clients
    serves_novel: bool = False

    def __init__(self, params: BaseModel, setup: Setup):
        self.params = params
        self.setup = setup

    # -- sizes, known on every rank ------------------------------------------------------
    def down_numel(self) -> int:
        return 0

    def up_numel(self) -> int:
        return 0

    def down_numel_of(self, client: int) -> int:
        """PerClient: the size of ``client``'s payload (may differ per client; default ``down_numel()``)."""
        return self.down_numel()

    def up_numel_of(self, client: int) -> int:
        """Gathered: the size of ``client``'s payload (may differ per client; default ``up_numel()``)."""
        return self.up_numel()

    def client_state_spec(self, group: int) -> dict[str, int]:
        """Names and sizes of the flat vectors a client of architecture ``group`` keeps between rounds."""
        return {}

    def state_specs(self) -> list[dict[str, int]]:
        """``client_state_spec`` of every architecture group, in group order, with the kept optimiser state."""
        return [{**self.client_state_spec(g), **self._optimizer_spec(g)} for g in range(self.setup.num_groups)]

    def _kept(self, group: int) -> KeptState | None:
        """Where the optimiser state of ``group``'s parameters sits (``train.optimizer_state: keep``), else None."""
        if self.setup.train.optimizer_state != "keep":
            return None
        cache = self.__dict__.setdefault("_kept_states", {})
        if group not in cache:
            cache[group] = KeptState(self.setup.train, self.setup.group_params(group))
        return cache[group]

    def _optimizer_spec(self, group: int) -> dict[str, int]:
        kept = self._kept(group)
        return {OPTIMIZER_STATE: kept.numel} if kept is not None and kept.numel else {}

    def initial_client_state(self, client_id: int) -> dict[str, torch.Tensor]:
        """``init_client_state`` with the kept optimiser state (zeros: no step yet), what the runtime stores."""
        spec = self._optimizer_spec(self.setup.group_of(client_id))
        return {**{name: torch.zeros(n) for name, n in spec.items()}, **self.init_client_state(client_id)}

    @classmethod
    def check_models(cls, params: BaseModel, models: list[torch.nn.Module]) -> None:
        """Refuse a configuration whose built models (one per architecture group) this algorithm cannot use:
        raise ``ConfigError`` naming the key. Runs before MPI starts; default: accept."""

    def init_client_state(self, client_id: int) -> dict[str, torch.Tensor]:
        """Initial value of a client's state (must depend on the seed and client only)."""
        return {}

    # -- server (rank 0) -----------------------------------------------------------------
    def init_server(self) -> None:
        """Build the server's state."""

    def downlink(self, round: int, clients: list[int], phase: Phase) -> torch.Tensor | list[torch.Tensor]:
        """Broadcast: [down_numel]; PerClient: [len(clients), down_numel], or a list of 1-D payloads of
        ``down_numel_of(k)`` elements (needed when sizes differ), in ``clients`` order. ``phase`` "train": the
        round's training (after the previous round's ``aggregate``); "eval": every client's evaluation payload
        after this round's ``aggregate`` (only when ``eval_down`` is declared), in blocks of clients."""
        raise NotImplementedError

    def aggregate(self, round: int, up: WeightedMean | Collected | None) -> dict[str, float]:
        """Update the server's state from what came up; return round metrics to record."""
        return {}

    def server_state(self) -> dict[str, torch.Tensor | dict]:
        """Everything the server needs to resume exactly: tensors (or numbers), possibly in nested dicts such as
        a torch optimizer's ``state_dict()["state"]``; the store flattens them (``store.nested``)."""
        return {}

    def load_server_state(self, state: dict[str, torch.Tensor | dict]) -> None:
        """Restore what ``server_state`` returned (the same nesting, tensors as leaves)."""

    def global_state(self) -> dict[str, torch.Tensor]:
        """The server's model(s), snapshotted into the run file."""
        return {}

    # -- client (a worker) ---------------------------------------------------------------
    def local_training(self, client: Client, **options) -> Means:
        """Train the client's model on its training split with the library's loop (``loop.local_training``:
        ``loss``, ``regulariser``, ``params``, ``epochs``/``steps``, ...); the mean of each metric over the batches."""
        options.setdefault("params", self.setup.params_for(client.id))
        options.setdefault("augment", self.setup.augment)
        regression = self.setup.task.name == "regression"
        if "loss" not in options and self.setup.loss is not cross_entropy:  # the task's or train.loss
            options["loss"] = self.setup.loss
        elif "loss" in options and not self.own_loss and (self.setup.loss is not self.setup.task.loss or regression):
            raise RuntimeError(f"{self.name} passes its own loss: declare own_loss = True (task, train.loss)")
        kept = None
        if "optimizer" not in options:  # the train section's, at this round of the schedule
            train, lr = self.setup.train, options.pop("lr", None)
            options["optimizer"] = make_optimizer(options["params"], train, client.round, self.setup.rounds, lr)
            kept = self._kept(self.setup.group_of(client.id))
        if kept is not None and kept.numel:
            kept.load(options["optimizer"], options["params"], client.state[OPTIMIZER_STATE])
        model = self.setup.model_for(client.id)
        means = local_training(model, *client.train, self.setup.train, client.generator, **options)
        if kept is not None and kept.numel:
            kept.store(options["optimizer"], options["params"], client.state[OPTIMIZER_STATE])
        return means

    def client_update(self, client: Client, payload: torch.Tensor | None) -> Update:
        """What ``client`` does with ``payload``. Default (for an algorithm that declares ``client_steps``, or
        ``begin_training``/``finish_training``): its steps, each training through the library's loop."""
        steps, means = self.client_steps(client, payload), None
        while True:
            try:
                options = steps.send(means)
            except StopIteration as done:
                return done.value
            means = self.train_with(client, options)

    def train_with(self, client: Client, options: dict) -> Means:
        """``local_training`` with the options a client step yields (``generator``: train from that generator
        instead of the client's own)."""
        if "generator" in options:
            options = dict(options)
            client = dataclasses.replace(client, generator=options.pop("generator"))
        return self.local_training(client, **options)

    @classmethod
    def batches_clients(cls) -> bool:
        """Whether the algorithm opts in to batched clients: a declared ``client_steps`` (or ``begin_training``),
        ``client_update`` not overridden. The others say "not batched" in their module's docstring."""
        declares = cls.client_steps is not Algorithm.client_steps or cls.begin_training is not Algorithm.begin_training
        return declares and cls.client_update is Algorithm.client_update

    @property
    def trains_in_blocks(self) -> bool:
        """Whether ``client_updates`` trains the clients in blocks of ``setup.client_batch`` (> 1)."""
        return self.setup.client_batch > 1 and self.batches_clients()

    def client_updates(self, clients: list[Client], payloads: Sequence) -> Iterator[Update]:
        """The updates of a worker's clients of a round, in ``clients`` order (what the runtime calls). An
        algorithm that declares ``client_steps`` (or ``begin_training``/``finish_training``) trains them in
        blocks of ``setup.client_batch`` (``blocks.train_in_blocks``) unless it overrides ``client_update``;
        otherwise ``client_update`` one after another."""
        if self.trains_in_blocks:
            from ..training.blocks import train_in_blocks

            yield from train_in_blocks(self, clients, payloads)
            return
        for client, payload in zip(clients, payloads, strict=True):
            yield self.client_update(client, payload)

    def client_steps(self, client: Client, payload: torch.Tensor | None) -> Generator[dict, Means, Update]:
        """Batched clients (opt-in, ``training/batched.py``): the client's step as a generator that loads into
        ``setup.model_for(client.id)`` the parameters a training starts from, yields the options of that
        ``local_training`` call (plus ``generator``, optionally), receives its means (the trained parameters then
        in the model), and so on; it returns the client's Update. It must not read what other clients left in the
        model. Default: ``begin_training``, one training, ``finish_training``."""
        options = self.begin_training(client, payload)
        if not isinstance(options, dict):
            return options
        means = yield options
        return self.finish_training(client, payload, means)

    def begin_training(self, client: Client, payload: torch.Tensor | None) -> dict | Update:
        """A one-training client step (see ``client_steps``): load the parameters ``client`` starts from and
        return the options of its ``local_training`` call, or its Update when it does not train this round."""
        raise NotImplementedError

    def finish_training(self, client: Client, payload: torch.Tensor | None, means: Means) -> Update:
        """After that training (the client's trained parameters in its model, ``means`` the loop's result): keep
        what persists in ``client.state`` and return what goes up."""
        raise NotImplementedError

    def load_for_eval(self, client: Client, payload: torch.Tensor | None) -> None:
        """Load into ``setup.model_for(client.id)`` the parameters this client would use: all of them (with
        ``client_batch`` > 1 the evaluator loads a block of clients one after another, then scores them stacked)."""
        raise NotImplementedError

    def evaluate_client(self, client: Client) -> tuple[float, ...]:
        """(test loss, test accuracy) of the model ``load_for_eval`` loaded for ``client``, then one value per
        name of ``eval_metrics``; override for another inference rule (e.g. FedProto's nearest prototype)."""
        return self.setup.task.evaluate(self.setup.model_for(client.id), *client.test)

    def serve_novel(self, client: Client, payload: torch.Tensor | None, budget: NovelBudget) -> None:
        """Load into ``setup.model_for(client.id)`` what a novel client (one that never trained) is served after
        training, adapted on its training split within ``budget`` (``novel_clients.fit_params``). ``payload``: its
        evaluation downlink; ``client.state``: a copy of its state as initialised; ``client.generator``: of a round
        never trained. Declared with ``serves_novel``."""
        raise NotImplementedError

    def novel_fit(self, clients: list[int], trained: list[int], budget: NovelBudget) -> object | None:
        """An exchange with the server that serves the novel ``clients`` (every rank builds it; pFedHN's
        ``novel_clients.EmbeddingFit``), or None: ``serve_novel`` serves each client alone. ``trained``: the
        clients that trained."""
        return None

    def load_global_for_eval(self, client: Client, payload: torch.Tensor | None) -> None:
        """Load into ``setup.model_for(client.id)`` the server's global model, for algorithms that keep one beside the
        personal models (Ditto's w, Per-FedAvg's w before personalisation): the runtime then records
        its test accuracy too (``global_test_acc``). Called only when ``evaluates_global`` is declared."""
        raise NotImplementedError
