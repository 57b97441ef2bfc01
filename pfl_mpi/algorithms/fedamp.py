"""FedAMP (Huang et al., AAAI 2021, "Personalized Cross-Silo Federated Learning on Non-IID Data"): attentive
message passing between personal models.

Moves (float32): down, PerClient: the cloud model u_i = sum_j xi_ij w_j of each sampled client; up, Gathered: its
trained personal model w_i. Evaluation sends nothing: a client is evaluated with its own w_i (its state).
Computes: the server keeps W, the latest w_j of every client (the initial model until j trains), and forms u_i
with the attention weights xi (``attention``: the paper's FedAMP, or HeurFedAMP's softmax of scaled cosine
similarities); client i takes the proximal step w_i <- argmin F_i(w) + lambda / (2 alpha_k) ||w - u_i||^2 by the
library loop with the proximal term as regulariser. Choices (where SGD starts, constant alpha_k, float64
similarities, the tuned sigma and xi_ii) and the full design: docs/algorithms.md#fedamp.

Over 150 lines: two attention rules (the paper's, HeurFedAMP's) and the server's table W of the clients' models.
Batched clients (``train.client_batch``): opted in; a block's clients are pulled each to its own u_i.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..models.params import ParamLayout
from ..training.proximal import ProximalTerm
from .base import Algorithm, Client, Collected, Gathered, PerClient, Phase, Setup, Update
from .registry import register


class FedAMPParams(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid", populate_by_name=True)
    attention: Literal["fedamp", "heurfedamp"] = Field(
        "heurfedamp",
        description="fedamp: xi_ij = alpha_k A'(||w_i - w_j||^2) with A(x) = 1 - exp(-x / sigma), xi_ii = 1 - the "
        "rest; heurfedamp: xi_ii fixed, the rest (1 - xi_ii) softmax_j(sigma cos(w_i, w_j))",
    )
    alpha_k: float = Field(
        1.0,
        gt=0,
        description="alpha_k: step size of the message-passing step (scales the attention to others, fedamp) and "
        "divides the proximal weight lambda / (2 alpha_k)",
    )
    lambda_: float = Field(
        1.0,
        ge=0,
        alias="lambda",
        description="lambda: weight of the attention-inducing term; the client's proximal weight is "
        "lambda / (2 alpha_k) (written 'lambda' in the config)",
    )
    sigma: float = Field(
        200.0,
        gt=0,
        description="sigma: fedamp, the scale of squared distances in A(x) = 1 - exp(-x / sigma); heurfedamp, the "
        "scale of the cosine similarities in the softmax",
    )
    xi_ii: float = Field(
        0.5, ge=0, le=1, description="heurfedamp only: the self-attention weight xi_ii of every cloud model u_i"
    )
    start: Literal["personal", "cloud"] = Field(
        "personal", description="where the client's local SGD starts: its own model w_i, or its cloud model u_i"
    )


@register
class FedAMP(Algorithm):
    name = "fedamp"
    tuning_grid = {"algorithm.lambda": [0.01, 0.1], "train.lr": [0.1, 0.3]}  # docs/tuning.md
    Params = FedAMPParams
    down = PerClient()
    up = Gathered()
    client_metrics = ("train_loss", "cloud_distance")

    def __init__(self, params: FedAMPParams, setup: Setup):
        super().__init__(params, setup)
        self.layout = ParamLayout(setup.model, [n for n, _ in setup.model.named_parameters()])
        self.initial = self.layout.flatten(setup.model)
        self.prox = params.lambda_ / (2 * params.alpha_k)  # weight of ||w - u_i||^2 in the client objective

    # -- sizes and state ------------------------------------------------------------------
    def down_numel(self) -> int:
        return self.layout.numel

    def up_numel(self) -> int:
        return self.layout.numel

    def client_state_spec(self, group: int) -> dict[str, int]:
        return {"model": self.layout.numel}

    def init_client_state(self, client_id: int) -> dict[str, torch.Tensor]:
        return {"model": self.initial.clone()}

    # -- server ---------------------------------------------------------------------------
    def init_server(self) -> None:
        # W: the latest personal model of every client (row i = w_i), all the initial model at first
        self.w = self.initial.expand(self.setup.num_clients, -1).clone()

    def attention(self, clients: list[int] | torch.Tensor) -> torch.Tensor:
        """Rows ``clients`` of xi [len(clients), N], float64, from the server's current W."""
        p = self.params
        return attention_weights(self.w, torch.as_tensor(clients), p.attention, p.alpha_k, p.sigma, p.xi_ii)

    def cloud_models(self, clients: list[int] | torch.Tensor) -> torch.Tensor:
        """u_i = sum_j xi_ij w_j for each client of ``clients``: [len(clients), d] float32."""
        return (self.attention(clients) @ self.w.double()).float()

    def downlink(self, round: int, clients: list[int], phase: Phase) -> torch.Tensor:
        return self.cloud_models(clients)

    def aggregate(self, round: int, up: Collected) -> dict[str, float]:
        ids = torch.as_tensor(up.clients, dtype=torch.long)
        self.w[ids] = up.payloads
        own = self.attention(ids)[torch.arange(len(ids)), ids]
        return {"xi_self_mean": float(own.mean()), "xi_self_min": float(own.min())}

    def server_state(self) -> dict[str, torch.Tensor]:
        return {"w": self.w}

    def load_server_state(self, state: dict[str, torch.Tensor]) -> None:
        self.w.copy_(state["w"])

    def global_state(self) -> dict[str, torch.Tensor]:
        """The attention matrix xi [N, N] of the current personal models (row i builds u_i)."""
        return {"attention": self.attention(torch.arange(self.setup.num_clients)).float()}

    # -- client ---------------------------------------------------------------------------
    def begin_training(self, client: Client, payload: torch.Tensor) -> dict:
        """The proximal step towards the cloud model u_i (``payload``): the library loop with the proximal term
        prox ||w - u_i||^2 (a ``ProximalTerm`` of coefficient 2 prox), from w_i or u_i (``start``)."""
        self.layout.load(self.setup.model, client.state["model"] if self.params.start == "personal" else payload)
        names = self.layout.names
        return {"regulariser": ProximalTerm(self.setup.params, names, payload, 2 * self.prox) if self.prox else None}

    def finish_training(self, client: Client, payload: torch.Tensor, means: dict) -> Update:
        w = self.layout.flatten(self.setup.model)
        client.state["model"].copy_(w)
        distance = float((w - payload).norm())
        return Update(w, 1.0, {"train_loss": means["train_loss"], "cloud_distance": distance})

    def load_for_eval(self, client: Client, payload: None) -> None:
        self.layout.load(self.setup.model, client.state["model"])


def attention_weights(
    w: torch.Tensor,
    rows: torch.Tensor,
    kind: str,
    alpha_k: float,
    sigma: float,
    xi_ii: float,
) -> torch.Tensor:
    """The rows ``rows`` of the attention matrix xi [len(rows), N] of the models ``w`` [N, d] (float64).

    Each row sums to 1; xi[r, rows[r]] is the self-attention weight xi_ii.
    """
    w = w.double()
    rows = torch.as_tensor(rows, dtype=torch.long)
    n, k = w.shape[0], rows.numel()
    if n == 1:
        return torch.ones(k, 1, dtype=torch.float64)
    own = torch.zeros(k, n, dtype=torch.bool)  # own[r, rows[r]]: the self-attention entries
    own[torch.arange(k), rows] = True
    gram = w[rows] @ w.T  # [k, N]
    sq = (w * w).sum(dim=1)
    if kind == "fedamp":
        dist2 = (sq[rows, None] + sq[None, :] - 2 * gram).clamp_min(0)
        dist2[own] = 0
        xi = (alpha_k / sigma) * torch.exp(-dist2 / sigma)
        xi[own] = 0
        xi[own] = 1 - xi.sum(dim=1)
        return xi
    if kind == "heurfedamp":
        norm = sq.sqrt().clamp_min(1e-12)
        cos = gram / (norm[rows, None] * norm[None, :])
        logits = (sigma * cos).masked_fill(own, float("-inf"))
        xi = (1 - xi_ii) * torch.softmax(logits, dim=1)
        xi[own] = xi_ii
        return xi
    raise ValueError(f"unknown attention {kind!r}")
