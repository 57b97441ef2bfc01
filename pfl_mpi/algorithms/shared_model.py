"""The model that FedAvg-like algorithms share: w, the parameters every client trains from (kept on the server
with its optimiser), and the personal ones each client keeps for itself, as one component an algorithm holds.

An algorithm builds ``SharedModel(setup, personal)`` (``personal(name)``: the one-line rule of the parameters
that never move; by default none) and delegates to it what FedAvg does with w (``SharedModelAlgorithm`` holds
the hooks that only delegate, once):

- client: ``state_spec``/``init_state`` (the personal parameters, the client state ``personal``), ``load``
  (w and the client's personal parameters into the model), ``update`` (load, train, keep the personal
  parameters, return w_k - w);
- server: ``init_server`` (w from the built model and, if given, the FedOpt optimiser), ``step`` (apply a
  mean update), ``server_state``/``load_server_state`` (checkpoint keys ``w`` and ``opt``) and
  ``global_state`` (``shared``).

What goes up and how the server combines it stay the algorithm's: FedAvg's weighted sum of w_k - w, QSGD's
quantised rows, signSGD's votes, FetchSGD's sketches. ``SharedModelAlgorithm`` therefore declares no uplink,
no ``aggregate`` and no ``client_update``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from pydantic import BaseModel

from ..models.params import ParamLayout, split_names
from .base import Algorithm, Broadcast, Client, Phase, Setup
from .novel_clients import NovelBudget, fit_params
from .server_opt import ServerOptConfig, ServerOptimizer
from .weighting import client_weight

Result = TypeVar("Result")


def nothing_personal(param_name: str) -> bool:
    """FedAvg's split: every parameter is shared."""
    return False


class SharedModel:
    """w (``numel`` floats: the shared parameters ``names`` in ``model.named_parameters()`` order) and the
    personal parameters (``personal_layout``) of ``setup.model``."""

    def __init__(self, setup: Setup, personal: Callable[[str], bool] = nothing_personal):
        self.setup, self.model = setup, setup.model
        shared, own = split_names(setup.model, personal)
        self.layout = ParamLayout(setup.model, shared)
        self.personal_layout = ParamLayout(setup.model, own)
        self.names, self.numel = self.layout.names, self.layout.numel
        self.initial_personal = self.personal_layout.flatten(setup.model)
        self.w = torch.zeros(0)  # the server's w, from ``init_server``
        self.optimizer: ServerOptimizer | None = None

    @property
    def has_personal(self) -> bool:
        return self.personal_layout.numel > 0

    def flatten(self) -> torch.Tensor:
        """The model's shared parameters as one float32 CPU vector (a copy)."""
        return self.layout.flatten(self.model)

    # -- client ---------------------------------------------------------------------------
    def state_spec(self) -> dict[str, int]:
        """The client state: the personal parameters, if there are any."""
        return {"personal": self.personal_layout.numel} if self.has_personal else {}

    def init_state(self) -> dict[str, torch.Tensor]:
        """Every client's personal parameters start as the built model's."""
        return {"personal": self.initial_personal.clone()} if self.has_personal else {}

    def load(self, client: Client, w: torch.Tensor) -> None:
        """Load w and ``client``'s personal parameters into the model."""
        self.layout.load(self.model, w)
        if self.has_personal:
            self.personal_layout.load(self.model, client.state["personal"])

    def update(
        self, client: Client, w: torch.Tensor, train: Callable[..., Result], **options
    ) -> tuple[torch.Tensor, Result]:
        """Load w and the client's personal parameters, run ``train(client, **options)`` (e.g. the algorithm's
        ``local_training``), keep the personal parameters in the client's state: (w_k - w, what train returned)."""
        self.load(client, w)
        result = train(client, **options)
        return self.collect(client, w), result

    def collect(self, client: Client, w: torch.Tensor) -> torch.Tensor:
        """After training (the client's trained parameters in the model): keep its personal parameters in its
        state; w_k - w. (``update`` without the load and the training, for batched clients.)"""
        if self.has_personal:
            client.state["personal"].copy_(self.personal_layout.flatten(self.model))
        return self.flatten() - w

    # -- server ---------------------------------------------------------------------------
    def init_server(self, opt: ServerOptConfig | None = None) -> None:
        """w from the built model and, unless ``opt`` is None, the server optimiser that ``step`` applies."""
        self.w = self.flatten()
        self.optimizer = ServerOptimizer(opt, self.numel, self.setup.rounds) if opt is not None else None

    def step(self, mean: torch.Tensor) -> dict[str, float]:
        """Apply the server optimiser to w with the mean update ``mean``; the round's ``update_norm``."""
        self.optimizer.step(self.w, mean)
        return {"update_norm": float(mean.norm())}

    def server_state(self) -> dict[str, torch.Tensor | dict]:
        return {"w": self.w, "opt": self.optimizer.state_dict()} if self.optimizer else {"w": self.w}

    def load_server_state(self, state: dict) -> None:
        self.w.copy_(state["w"])
        if self.optimizer:
            self.optimizer.load_state_dict(state["opt"])

    def global_state(self) -> dict[str, torch.Tensor]:
        return {"shared": self.w}


class SharedModelAlgorithm(Algorithm):
    """An algorithm that holds a ``SharedModel`` as ``self.shared`` (split by its ``personal``): w goes down
    (Broadcast, to train and to evaluate), clients evaluate w with their personal parameters, the server
    state is w and the optimiser of ``params.server_opt``. These hooks only delegate; override any of them.
    A subclass declares its own ``up``, ``up_numel``, ``aggregate`` and ``client_update``."""

    down = Broadcast()
    eval_down = Broadcast()
    serves_novel = True  # the global model w, adapted: ``serve_novel``

    def personal(self, param_name: str) -> bool:
        """Whether a parameter stays on its client (never moves); by default none does."""
        return False

    def __init__(self, params: BaseModel, setup: Setup):
        super().__init__(params, setup)
        self.shared = SharedModel(setup, self.personal)

    def down_numel(self) -> int:
        return self.shared.numel

    def client_state_spec(self, group: int) -> dict[str, int]:
        return self.shared.state_spec()

    def init_client_state(self, client_id: int) -> dict[str, torch.Tensor]:
        return self.shared.init_state()

    def init_server(self) -> None:
        self.shared.init_server(self.params.server_opt)

    def downlink(self, round: int, clients: list[int], phase: Phase) -> torch.Tensor:
        return self.shared.w

    def server_state(self) -> dict[str, torch.Tensor | dict]:
        return self.shared.server_state()

    def load_server_state(self, state: dict) -> None:
        self.shared.load_server_state(state)

    def global_state(self) -> dict[str, torch.Tensor]:
        return self.shared.global_state()

    def load_for_eval(self, client: Client, payload: torch.Tensor) -> None:
        self.shared.load(client, payload)

    def serve_novel(self, client: Client, payload: torch.Tensor, budget: NovelBudget) -> None:
        """The global model w (the payload's first ``shared.numel`` values) with the client's initial personal
        parameters; the personal ones (FedPer's and FedRep's head, LG-FedAvg's base) fitted on the frozen shared
        ones, or, when none is personal, all of w fine-tuned, for ``budget.epochs``."""
        self.shared.load(client, payload[: self.shared.numel])
        named = dict(self.setup.model.named_parameters())
        personal = [named[n] for n in self.shared.personal_layout.names]
        fit_params(self, client, personal or self.setup.params, budget)


class TrainsFromW(SharedModelAlgorithm):
    """A ``SharedModelAlgorithm`` whose client step is one run of the library's loop from w (FedAvg's, and that of
    the compressors and robust aggregators that send w_k - w in their own form): ``begin_training`` loads w and
    the personal parameters, ``trained`` gives w_k - w and the client's weight (``params.weighting``) to the
    subclass's ``finish_training``. Blocks of clients train together (training/batched.py)."""

    def begin_training(self, client: Client, payload: torch.Tensor) -> dict:
        self.shared.load(client, payload)
        return {}

    def trained(self, client: Client, payload: torch.Tensor) -> tuple[torch.Tensor, float]:
        """After the training (the trained model still loaded: ``quality`` weighting scores it): keep the personal
        parameters; (w_k - w, the client's weight)."""
        return self.shared.collect(client, payload), client_weight(self.params.weighting, client, self.setup)
