"""pFedHN and pFedHN-PC (Shamsian et al., ICML 2021): a hypernetwork on the server generates every client's model.

Moves: down, PerClient: theta_i = h(v_i; phi), the target network's parameters for each sampled client (Scatterv);
up, Gathered: delta_i = theta_i - theta_i~ after the client's local steps (Gatherv). phi (the hypernetwork and
the client embeddings v_i) lives on rank 0 only and is never a payload.

Computes: a client loads theta_i and runs ``inner_steps`` SGD steps, each on a fresh random minibatch of
``train.batch_size`` of its training split (the authors' ``next(iter(loader))``), with ``inner_lr``,
``inner_momentum``, ``inner_weight_decay`` and its gradient norm clipped to ``inner_grad_clip``. The server
backpropagates every difference through the graph it kept from ``downlink``:
g = (1/|S|) sum_i J_i^T delta_i = torch.autograd.grad(theta, phi, grad_outputs=delta / |S|), clips ||g|| to
``grad_clip`` and takes one SGD step (momentum, weight decay) on phi, embeddings included.

pFedHN-PC: the hypernetwork generates only the feature extractor (``base.*``); each client's classifier
(``head.*``) is its state, trained with the base in its local steps, and never moves.

Novel clients: :func:`learn_novel_embedding` (phi frozen, a new embedding learned through the hypernetwork).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..models.hypernetwork import HyperNetwork
from ..models.params import ParamLayout, split_names
from ..runtime.seeding import derive_seed
from .base import Algorithm, Client, Collected, Gathered, PerClient, Setup, Update
from .registry import register
from .training import evaluate

_HYPERNETWORK_SEED = 0x4846  # stream tag of the hypernetwork's initialisation


class PFedHNParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

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


def _clip_(grads: Sequence[torch.Tensor], max_norm: float) -> float:
    """Scale ``grads`` in place to a total L2 norm of at most ``max_norm`` (torch's clip_grad_norm_ rule)."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = max_norm / (float(norm) + 1e-6)
    if scale < 1:
        for g in grads:
            g.mul_(scale)
    return float(norm)


def _sgd_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    buffers: Sequence[torch.Tensor],
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """torch's SGD rule (weight decay, then momentum with dampening 0) with zero-initialised buffers."""
    for p, g, buf in zip(params, grads, buffers, strict=True):
        buf.mul_(momentum).add_(g).add_(p, alpha=weight_decay)
        p.add_(buf, alpha=-lr)


@register
class PFedHN(Algorithm):
    name = "pfedhn"
    Params = PFedHNParams
    down = PerClient()
    up = Gathered()

    def personal(self, param_name: str) -> bool:
        """Whether a parameter is a client's own instead of generated. pFedHN generates everything."""
        return False

    def __init__(self, params: PFedHNParams, setup: Setup):
        super().__init__(params, setup)
        generated, personal = split_names(setup.model, self.personal)
        self.layout = ParamLayout(setup.model, generated)
        self.personal_layout = ParamLayout(setup.model, personal)
        self.initial_personal = self.personal_layout.flatten(setup.model)

    def down_numel(self) -> int:
        return self.layout.numel

    def up_numel(self) -> int:
        return self.layout.numel

    def client_state_spec(self) -> dict[str, int]:
        return {"head": self.personal_layout.numel} if self.personal_layout.numel else {}

    def init_client_state(self, client_id: int) -> dict[str, torch.Tensor]:
        return {"head": self.initial_personal.clone()} if self.personal_layout.numel else {}

    # -- server ---------------------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        return self.params.embedding_dim or int(1 + self.setup.num_clients / 4)

    def init_server(self) -> None:
        """The hypernetwork (on the CPU, as rank 0 is under MPI) and its optimiser's momentum buffers."""

        p = self.params
        generator = torch.Generator().manual_seed(derive_seed(self.setup.seed, _HYPERNETWORK_SEED))
        self.hnet = HyperNetwork(
            self.setup.num_clients, self.layout.numels, self.embedding_dim, p.hidden_dim, p.n_hidden, generator
        )
        self.phi = list(self.hnet.parameters())
        self.momentum_buffers = [torch.zeros_like(q) for q in self.phi]
        self._graph: tuple[list[int], torch.Tensor] | None = None  # (clients, theta) of the round in training
        self._aggregated = -1  # last round aggregated: a later downlink of that round is the evaluation's

    def downlink(self, round: int, clients: list[int]) -> torch.Tensor:
        """theta_i = h(v_i; phi) per client; in training the graph is kept for ``aggregate``."""
        ids = torch.as_tensor(clients, dtype=torch.long)
        if round == self._aggregated:  # evaluation of every client after this round's update
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
        with torch.no_grad():
            norm = _clip_(grads, self.params.grad_clip)
            p = self.params
            _sgd_step_(self.phi, grads, self.momentum_buffers, p.lr, p.momentum, p.weight_decay)
        self._aggregated = round
        return {"hn_grad_norm": norm, "delta_norm": float(delta.norm(dim=1).mean())}

    def server_state(self) -> dict[str, torch.Tensor]:
        return {"phi": self._flat(self.phi), "momentum": self._flat(self.momentum_buffers)}

    def load_server_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensors in (("phi", self.phi), ("momentum", self.momentum_buffers)):
                flat = state[name].reshape(-1)
                for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
                    t.copy_(chunk.view_as(t))

    def global_state(self) -> dict[str, torch.Tensor]:
        return {"phi": self._flat(self.phi)}

    @staticmethod
    def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in tensors]).to(torch.float32)

    # -- client ---------------------------------------------------------------------------
    def _load(self, client: Client, theta: torch.Tensor) -> None:
        self.layout.load(self.setup.model, theta)
        if self.personal_layout.numel:
            self.personal_layout.load(self.setup.model, client.state["head"])

    def _local_steps(self, client: Client) -> float:
        """``inner_steps`` SGD steps on all the model's parameters; return the mean minibatch loss."""
        p, model, params = self.params, self.setup.model, self.setup.params
        model.train()
        x, y = client.train
        n = x.shape[0]
        buffers = [torch.zeros_like(q) for q in params]
        total = torch.zeros((), device=x.device)
        for _ in range(p.inner_steps):
            idx = torch.randperm(n, generator=client.generator)[: self.setup.train.batch_size].to(x.device)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                _clip_(grads, p.inner_grad_clip)
                _sgd_step_(params, grads, buffers, p.inner_lr, p.inner_momentum, p.inner_weight_decay)
                total += loss.detach()
        return float(total) / p.inner_steps

    def client_update(self, client: Client, payload: torch.Tensor) -> Update:
        self._load(client, payload)
        loss = self._local_steps(client)
        if self.personal_layout.numel:
            client.state["head"].copy_(self.personal_layout.flatten(self.setup.model))
        delta = payload - self.layout.flatten(self.setup.model)
        return Update(delta, 1.0, {"train_loss": loss})

    def load_for_eval(self, client: Client, payload: torch.Tensor) -> None:
        self._load(client, payload)


@register
class PFedHNPC(PFedHN):
    name = "pfedhn-pc"

    def personal(self, param_name: str) -> bool:
        return param_name.startswith("head.")


def learn_novel_embedding(algorithm: PFedHN, client: Client, steps: int, lr: float) -> tuple[torch.Tensor, list[float]]:
    """Generalisation to a novel client (the paper's experiment): phi frozen, only a new embedding v is learned.

    Each step is the federated protocol for that one client: theta = h(v; phi) goes down, the client runs its
    local steps (``client_update``: a PC client also trains its head, in ``client.state``), delta comes up, and
    only v moves: v <- v - lr * clip(J_v^T delta). v starts at the mean of the learned embeddings. Runs in one
    process, on the server's ``algorithm`` (``init_server`` done) with the client's data at hand.

    Returns v ``[embedding_dim]`` and the client's training loss under h(v) before each step and after the last.
    """
    hnet = algorithm.hnet
    v = hnet.embeddings.weight.detach().mean(dim=0, keepdim=True).clone().requires_grad_(True)
    model, losses = algorithm.setup.model, []

    def loss_of(theta: torch.Tensor) -> float:
        algorithm.load_for_eval(client, theta)
        return evaluate(model, *client.train)[0]

    for _ in range(steps):
        theta = hnet.generate(v)[0]
        losses.append(loss_of(theta.detach()))
        delta = algorithm.client_update(client, theta.detach()).payload
        (grad,) = torch.autograd.grad(theta, v, grad_outputs=delta.to(theta.dtype))
        with torch.no_grad():
            _clip_([grad], algorithm.params.grad_clip)
            v -= lr * grad
    with torch.no_grad():
        losses.append(loss_of(hnet.generate(v)[0]))
    return v.detach()[0], losses
