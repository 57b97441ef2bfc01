"""pFedHN and pFedHN-PC (Shamsian et al., ICML 2021): a hypernetwork on the server generates every client's model.

Moves: down, PerClient: theta_i = h(v_i; phi) for each sampled client (and for every client at evaluation); up,
Gathered: delta_i = theta_i - theta_i~ after the client's local steps. phi (the hypernetwork with the client
embeddings v_i) stays on rank 0. Computes: a client runs ``inner_steps`` clipped SGD steps of the library loop, each
on a fresh random minibatch; the server backpropagates the deltas through the graph kept from ``downlink``,
g = (1/|S|) sum_i J_i^T delta_i, clips ||g|| and takes one SGD step on phi. pFedHN-PC generates only the feature
extractor (``base.*``); each client's classifier (``head.*``) is its state and never moves, trained by its own
unclipped SGD whose momentum the client keeps between rounds (the authors' code; ``head_optimizer``). Novel
clients: ``novel_clients.learn_novel_embedding``. The full design: docs/algorithms.md#pfedhn-and-pfedhn-pc.
Not batched (``train.client_batch``): clients train one after another (inner steps, own optimiser).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..models.hypernetwork import HyperNetwork
from ..models.params import ParamLayout, split_names
from ..models.split import in_head
from ..seeding import derive_seed
from ..training.grouped_optimizer import Grouped
from ..training.loop import SGD
from .base import Algorithm, Client, Collected, Gathered, PerClient, Phase, Setup, Update
from .novel_clients import embedding_fit
from .registry import register

_HYPERNETWORK_SEED = 0x4846  # stream tag of the hypernetwork's initialisation


class PFedHNParams(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    embedding_dim: int | None = Field(
        None, ge=1, description="dimension of the client embeddings v_i; None: int(1 + N/4), the paper's choice"
    )
    hidden_dim: int = Field(100, ge=1, description="width of the hypernetwork's hidden layers")
    n_hidden: int = Field(
        3, ge=0, description="Linear(hidden_dim, hidden_dim) layers after the first one (the authors' n_hidden)"
    )
    lr: float = Field(1e-2, gt=0, description="hypernetwork learning rate (phi, embeddings included)")
    momentum: float = Field(0.9, ge=0, lt=1, description="hypernetwork SGD momentum")
    weight_decay: float = Field(1e-3, ge=0, description="hypernetwork SGD weight decay")
    grad_clip: float = Field(50.0, gt=0, description="largest L2 norm of the hypernetwork's gradient")
    inner_steps: int = Field(
        50, ge=1, description="K: local SGD steps per round, each on a random minibatch of train.batch_size"
    )
    inner_lr: float = Field(5e-3, gt=0, description="local (inner) SGD learning rate")
    inner_momentum: float = Field(0.9, ge=0, lt=1, description="local SGD momentum, reset every round")
    inner_weight_decay: float = Field(5e-5, ge=0, description="local SGD weight decay")
    inner_grad_clip: float = Field(50.0, gt=0, description="largest L2 norm of a local gradient")
    head_optimizer: Literal["own", "shared"] = Field(
        "own",
        description="pfedhn-pc: the head's own SGD (inner lr, momentum, weight decay; unclipped), its momentum kept "
        "by the client between rounds, as the authors' code; shared: in the base's clipped SGD, reset every round",
    )


@register
class PFedHN(Algorithm):
    name = "pfedhn"
    tuning_grid = {"algorithm.inner_lr": [0.05, 0.15], "algorithm.lr": [0.05, 0.15]}
    Params = PFedHNParams
    down = PerClient()
    eval_down = PerClient()  # theta_i of every client, generated after the round's update
    replaces_train = {
        "lr": "algorithm.inner_lr",
        "local_epochs": "algorithm.inner_steps",
        "optimizer": "the inner SGD (algorithm.inner_lr, inner_momentum, inner_weight_decay)",
        "momentum": "algorithm.inner_momentum",
        "nesterov": "the inner SGD (algorithm.inner_momentum)",
        "weight_decay": "algorithm.inner_weight_decay",
        "clip_norm": "algorithm.inner_grad_clip",
        "schedule": "algorithm.inner_lr",
    }
    up = Gathered()
    serves_novel = True
    novel_fit = embedding_fit  # a novel client: a new embedding fitted with phi frozen (novel_clients.EmbeddingFit)

    def personal(self, param_name: str) -> bool:
        """Whether a parameter is a client's own instead of generated. pFedHN generates everything."""
        return False

    def __init__(self, params: PFedHNParams, setup: Setup):
        super().__init__(params, setup)
        generated, personal = split_names(setup.model, self.personal)
        self.layout = ParamLayout(setup.model, generated)  # theta: what the hypernetwork generates
        self.personal_layout = ParamLayout(setup.model, personal)
        self.initial_personal = self.personal_layout.flatten(setup.model)
        named = list(setup.model.named_parameters())
        self.groups = [p for n, p in named if not self.personal(n)], [p for n, p in named if self.personal(n)]
        own = params.head_optimizer == "own" and params.inner_momentum > 0  # momentum 0: nothing to keep
        self.head_numels = [p.numel() for p in self.groups[1]]
        self.momentum_numel = sum(self.head_numels) if own else 0

    # -- sizes and state ------------------------------------------------------------------
    def down_numel(self) -> int:
        return self.layout.numel

    def up_numel(self) -> int:
        return self.layout.numel

    def client_state_spec(self, group: int) -> dict[str, int]:
        spec = {"head": self.personal_layout.numel, "head_momentum": self.momentum_numel}
        return {name: n for name, n in spec.items() if n}

    def init_client_state(self, client_id: int) -> dict[str, torch.Tensor]:
        state = {"head": self.initial_personal.clone(), "head_momentum": torch.zeros(self.momentum_numel)}
        return {name: t for name, t in state.items() if t.numel()}

    # -- server ---------------------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        return self.params.embedding_dim or int(1 + self.setup.num_clients / 4)

    def init_server(self) -> None:
        """The hypernetwork (on the CPU, as rank 0 is under MPI) and its SGD (momentum buffers, clipping)."""
        p = self.params
        generator = torch.Generator().manual_seed(derive_seed(self.setup.seed, _HYPERNETWORK_SEED))
        self.hnet = HyperNetwork(
            self.setup.num_clients, self.layout.numels, self.embedding_dim, p.hidden_dim, p.n_hidden, generator
        )
        self.phi = list(self.hnet.parameters())
        self.phi_layout = ParamLayout(self.hnet, [n for n, _ in self.hnet.named_parameters()])
        self.optimizer = SGD(self.phi, p.lr, p.momentum, p.weight_decay, clip=p.grad_clip)
        self._graph: tuple[list[int], torch.Tensor] | None = None  # (clients, theta) of the round in training

    def downlink(self, round: int, clients: list[int], phase: Phase) -> torch.Tensor:
        """theta_i = h(v_i; phi) per client; in training the graph is kept for ``aggregate``."""
        ids = torch.as_tensor(clients, dtype=torch.long)
        if phase == "eval":
            with torch.no_grad():
                return self.hnet(ids)
        theta = self.hnet(ids)
        self._graph = (list(clients), theta)
        return theta.detach()

    def aggregate(self, round: int, up: Collected) -> dict[str, float]:
        if self._graph is None or self._graph[0] != list(up.clients):
            raise RuntimeError("pfedhn: aggregate expects the clients of the last training downlink")
        clients, theta = self._graph
        self._graph = None
        delta = up.payloads.to(theta.dtype)
        grads = torch.autograd.grad(theta, self.phi, grad_outputs=delta / len(clients))
        norm = self.optimizer.step(grads)
        return {"hn_grad_norm": norm, "delta_norm": float(delta.norm(dim=1).mean())}

    def server_state(self) -> dict[str, torch.Tensor | dict]:
        return {"phi": self.phi_layout.flatten(self.hnet), "momentum": dict(enumerate(self.optimizer.buffers or []))}

    def load_server_state(self, state: dict[str, torch.Tensor | dict]) -> None:
        self.phi_layout.load(self.hnet, state["phi"].reshape(-1))
        for i, buffer in enumerate(self.optimizer.buffers or []):
            buffer.copy_(state["momentum"][i])

    def global_state(self) -> dict[str, torch.Tensor]:
        return {"phi": self.phi_layout.flatten(self.hnet)}

    # -- client ---------------------------------------------------------------------------
    def _load(self, client: Client, theta: torch.Tensor) -> None:
        self.layout.load(self.setup.model, theta)
        if self.personal_layout.numel:
            self.personal_layout.load(self.setup.model, client.state["head"])

    def client_update(self, client: Client, payload: torch.Tensor) -> Update:
        """``inner_steps`` SGD steps, each on a fresh random minibatch: clipped on the generated parameters; the
        head's own (kept momentum) with ``head_optimizer: own``, else in the same clipped step."""
        self._load(client, payload)
        p, (base, head) = self.params, self.groups
        sgd = p.inner_lr, p.inner_momentum, p.inner_weight_decay
        if head and p.head_optimizer == "own":
            params, head_sgd = base + head, SGD(head, *sgd)
            optimizer = Grouped(SGD(base, *sgd, clip=p.inner_grad_clip), head_sgd, split=len(base))
            kept = client.state["head_momentum"].split(self.head_numels) if self.momentum_numel else []
            for buf, value in zip(head_sgd.buffers or [], kept, strict=True):
                buf.copy_(value.view_as(buf))
        else:
            params = self.setup.params
            optimizer = SGD(params, *sgd, clip=p.inner_grad_clip)
        means = self.local_training(client, params=params, steps=p.inner_steps, optimizer=optimizer)
        if self.personal_layout.numel:
            client.state["head"].copy_(self.personal_layout.flatten(self.setup.model))
        if self.momentum_numel:
            client.state["head_momentum"].copy_(torch.cat([b.reshape(-1) for b in head_sgd.buffers]))
        return Update(payload - self.layout.flatten(self.setup.model), 1.0, {"train_loss": means["train_loss"]})

    def load_for_eval(self, client: Client, payload: torch.Tensor) -> None:
        self._load(client, payload)


@register
class PFedHNPC(PFedHN):
    name = "pfedhn-pc"

    def personal(self, param_name: str) -> bool:
        return in_head(self.setup.model, param_name)
