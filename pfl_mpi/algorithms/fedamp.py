"""FedAMP (Huang et al., AAAI 2021, "Personalized Cross-Silo Federated Learning on Non-IID Data").

Every client i keeps a personal model w_i (its state; evaluation uses it). The paper minimises
sum_i F_i(w_i) + lambda sum_{i<j} A(||w_i - w_j||^2) for an increasing concave A, alternating two steps:

- attentive message passing (server): one gradient step of size alpha_k on the second term gives each
  client a personalised cloud model u_i = sum_j xi_ij w_j, a combination of all the personal models in
  which the models similar to w_i weigh more;
- a proximal step (client i): w_i <- argmin_w F_i(w) + (lambda / (2 alpha_k)) ||w - u_i||^2, solved
  approximately by ``train.local_epochs`` epochs of minibatch SGD; w_i goes back to the server.

Attention weights (``attention``), each row of xi summing to 1:

- ``fedamp`` (the paper's FedAMP with its A(x) = 1 - exp(-x / sigma), as in its experiments):
  xi_ij = alpha_k A'(||w_i - w_j||^2) = (alpha_k / sigma) exp(-||w_i - w_j||^2 / sigma) for j != i,
  and the self-attention weight xi_ii = 1 - sum_{j != i} xi_ij. u_i is a convex combination only while
  xi_ii >= 0, which alpha_k (N - 1) / sigma <= 1 guarantees; nothing here enforces it (the paper asks
  for a small enough alpha_k): ``xi_self_min`` in the run file shows it. A negative xi_ii extrapolates
  and, measured here, degrades accuracy.
- ``heurfedamp`` (the paper's HeurFedAMP, proposed for deep networks, and the default): xi_ii is a
  hyper-parameter and the rest is a softmax of scaled cosine similarities,
  xi_ij = (1 - xi_ii) exp(sigma cos(w_i, w_j)) / sum_{h != i} exp(sigma cos(w_i, w_h)).

Which models enter u_i under client sampling: the server keeps W, the latest model it received from
every client, initialised to the initial model (every client's initial personal model). A client's
personal model changes only when it trains, and it then sends it up, so W is exactly the current
personal model of every client, and u_i is the paper's message-passing step over all N of them;
sampling only chooses which clients take the proximal step. FedAMP inherently needs this: the server
holds N x d floats (``server_state()["w"]``), and the u_i of K clients cost O(K N d) to compute.

Moves, per round with K sampled clients and a model of d parameters (float32): down = PerClient
(u_i: Scatterv of 4 K d bytes in all), up = Gathered (the trained w_i: Gatherv of 4 K d bytes).
Evaluation scatters u_i to every client (label ``eval_down``, not the algorithm's cost), which
``load_for_eval`` ignores: a client is evaluated with its own w_i.

Choices made here: where the client's SGD starts, its own w_i (``start: personal``, as the public
reimplementations do) or u_i (``start: cloud``); alpha_k is constant over rounds; distances and
similarities are computed in float64. Defaults: lambda = alpha_k = 1 as in the public
reimplementations; the paper's own table of values was not available when this was written, so
sigma = 200 and xi_ii = 0.5 are values tuned on configs/fedamp.yaml (an MLP, whose flattened weights
have cosine similarities within a few hundredths of each other, hence the large sigma).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..models.params import ParamLayout
from .base import Algorithm, Client, Collected, Gathered, PerClient, Setup, Update
from .registry import register


class FedAMPParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
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


@register
class FedAMP(Algorithm):
    name = "fedamp"
    Params = FedAMPParams
    down = PerClient()
    up = Gathered()
    client_metrics = ("train_loss", "cloud_distance")

    def __init__(self, params: FedAMPParams, setup: Setup):
        super().__init__(params, setup)
        self.layout = ParamLayout(setup.model, [n for n, _ in setup.model.named_parameters()])
        self.initial = self.layout.flatten(setup.model)
        self.prox = params.lambda_ / (2 * params.alpha_k)  # weight of ||w - u_i||^2 in the client objective

    def down_numel(self) -> int:
        return self.layout.numel

    def up_numel(self) -> int:
        return self.layout.numel

    def client_state_spec(self) -> dict[str, int]:
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

    def downlink(self, round: int, clients: list[int]) -> torch.Tensor:
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
    def client_update(self, client: Client, payload: torch.Tensor) -> Update:
        model, params = self.setup.model, self.setup.params
        self.layout.load(model, client.state["model"] if self.params.start == "personal" else payload)
        cloud = [
            u.view(shape)
            for u, shape in zip(payload.to(params[0].device).split(self.layout.numels), self.layout.shapes, strict=True)
        ]

        def proximal() -> torch.Tensor:
            return self.prox * sum(((p - u) ** 2).sum() for p, u in zip(params, cloud, strict=True))

        loss = self.local_sgd(client, regulariser=proximal if self.prox else None)
        w = self.layout.flatten(model)
        client.state["model"].copy_(w)
        distance = float((w - payload).norm())
        return Update(w, 1.0, {"train_loss": loss, "cloud_distance": distance})

    def load_for_eval(self, client: Client, payload: torch.Tensor) -> None:
        self.layout.load(self.setup.model, client.state["model"])
