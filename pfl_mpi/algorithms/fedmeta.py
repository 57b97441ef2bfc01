"""FedMeta (Chen, Luo, Dong, Li and He, 2018): a meta-learner shared instead of a model.

Moves: the meta-learner's parameters go down by Broadcast: theta (MAML, FOMAML) or concat(theta, alpha)
for Meta-SGD, whose alpha is a learned vector of per-parameter inner step sizes, one per model parameter.
Each client's meta-gradient comes up as a WeightedSum (same layout: g_theta, or concat(g_theta, g_alpha));
the server steps on the weighted mean meta-gradient g with the outer learning rate beta:

- ``outer_optimizer: sgd`` (the paper's Algorithm 1): (theta, alpha) <- (theta, alpha) - beta g;
- ``outer_optimizer: adam``: FedOpt's Adam (``server_opt.ServerOptimizer``: beta1 0.9, beta2 0.99,
  tau 1e-3, no bias correction) with lr beta on the pseudo-update -g.

Computes, on a client, one episode per round: its training split is shuffled with the client's generator
and cut into a support set D_S (the first ``support_fraction`` of the permutation, at least one sample)
and a query set D_Q (the rest); ``inner_steps`` full-batch steps on D_S from theta

    theta' = theta - alpha grad L(theta; D_S)          (Meta-SGD: theta - alpha o grad L(theta; D_S))

and the meta-gradient of the query loss L(theta'; D_Q):

- maml: d L(theta'; D_Q) / d theta, differentiating through the inner steps (second order);
- fomaml: grad L(theta'; D_Q) evaluated at theta' (first order: the inner steps' Jacobian dropped);
- metasgd: d L(theta'; D_Q) / d (theta, alpha), second order.

The reported ``train_loss`` is L(theta'; D_Q). Evaluation adapts as training does, with the client's whole
training split as the support set: ``inner_steps`` full-batch steps (with the learned alpha for Meta-SGD),
then the test split. Clients keep no state.

Over 150 lines: three meta-gradients (MAML, FOMAML, Meta-SGD) and two outer optimisers. Batched clients
(``train.client_batch``): not batched, clients train one after another: a meta-learning inner loop.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .base import Algorithm, Broadcast, Client, Phase, Setup, Update, WeightedMean, WeightedSum
from .meta import FunctionalModel, leaves
from .registry import register
from .server_opt import ServerOptConfig, ServerOptimizer
from .weighting import client_weight


class FedMetaParams(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")
    variant: Literal["maml", "fomaml", "metasgd"] = Field(
        "maml", description="meta-learner: MAML (second order), first-order MAML, or Meta-SGD (learned alpha)"
    )
    alpha: float = Field(0.01, gt=0, description="inner step size alpha (metasgd: initial value of every entry)")
    beta: float = Field(0.001, gt=0, description="outer (meta) learning rate beta of the server")
    outer_optimizer: Literal["sgd", "adam"] = Field(
        "sgd", description="server step on the mean meta-gradient: sgd (the paper's rule) or FedOpt's Adam"
    )
    inner_steps: int = Field(1, ge=1, description="gradient steps on the support set (training and evaluation)")
    support_fraction: float = Field(
        0.2, gt=0, lt=1, description="fraction of a client's training split drawn as its support set each round"
    )
    weighting: Literal["uniform", "samples"] = Field("uniform", description="client weights of the mean meta-gradient")


@register
class FedMeta(Algorithm):
    name = "fedmeta"
    tuning_grid = {"algorithm.alpha": [0.2, 0.5], "algorithm.beta": [0.01, 0.03]}
    own_loss = True  # its own cross-entropy: classification only, no train.loss
    Params = FedMetaParams
    down = Broadcast()
    eval_down = Broadcast()
    serves_novel = True  # as every client: theta adapted on its training split (``serve_novel``)
    replaces_train = {
        "lr": "algorithm.alpha (inner) and algorithm.beta (outer)",
        "batch_size": "algorithm.support_fraction (support and query sets are whole splits)",
        "local_epochs": "algorithm.inner_steps",
        "optimizer": "algorithm.outer_optimizer (the inner steps are plain SGD)",
        "momentum": "FedMeta's own steps (plain SGD inside, algorithm.outer_optimizer outside)",
        "nesterov": "FedMeta's own steps (plain SGD inside, algorithm.outer_optimizer outside)",
        "weight_decay": "FedMeta's own steps (no weight decay)",
        "clip_norm": "FedMeta's own steps (unclipped)",
        "schedule": "algorithm.alpha and algorithm.beta",
    }
    up = WeightedSum()

    def __init__(self, params: FedMetaParams, setup: Setup):
        super().__init__(params, setup)
        self.fn = FunctionalModel(setup.model)
        self.metasgd = params.variant == "metasgd"

    @property
    def numel(self) -> int:
        """Size of the meta-learner: theta, and alpha for Meta-SGD."""
        return self.fn.numel * (2 if self.metasgd else 1)

    def down_numel(self) -> int:
        return self.numel

    def up_numel(self) -> int:
        return self.numel

    # -- server ---------------------------------------------------------------------------
    def init_server(self) -> None:
        theta = self.fn.layout.flatten(self.setup.model)
        parts = [theta, torch.full_like(theta, self.params.alpha)] if self.metasgd else [theta]
        self.x = torch.cat(parts)
        cfg = ServerOptConfig(name=self.params.outer_optimizer, lr=self.params.beta)
        self.optimizer = ServerOptimizer(cfg, self.numel, self.setup.rounds)

    def downlink(self, round: int, clients: list[int], phase: Phase) -> torch.Tensor:
        return self.x

    def aggregate(self, round: int, up: WeightedMean) -> dict[str, float]:
        self.optimizer.step(self.x, -up.mean)  # the optimiser moves along its input: minus the gradient
        metrics = {"meta_grad_norm": float(up.mean.norm())}
        if self.metasgd:
            alpha = self.x[self.fn.numel :]
            metrics.update(alpha_mean=float(alpha.mean()), alpha_min=float(alpha.min()), alpha_max=float(alpha.max()))
        return metrics

    def server_state(self) -> dict[str, torch.Tensor]:
        return {"x": self.x, "opt": self.optimizer.state_dict()}

    def load_server_state(self, state: dict[str, torch.Tensor]) -> None:
        self.x.copy_(state["x"])
        self.optimizer.load_state_dict(state["opt"])

    def global_state(self) -> dict[str, torch.Tensor]:
        d = self.fn.numel
        return {"shared": self.x[:d], "alpha": self.x[d:]} if self.metasgd else {"shared": self.x}

    # -- client ---------------------------------------------------------------------------
    def _unpack(self, payload: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """theta and (Meta-SGD) alpha as leaf tensors shaped like the model's parameters."""
        d, device = self.fn.numel, self.setup.device
        theta = self.fn.unflatten(payload[:d], device)
        alpha = self.fn.unflatten(payload[d:], device) if self.metasgd else None
        return theta, alpha

    def adapt(
        self,
        theta: list[torch.Tensor],
        alpha: list[torch.Tensor] | None,
        x: torch.Tensor,
        y: torch.Tensor,
        create_graph: bool,
    ) -> list[torch.Tensor]:
        """``inner_steps`` full-batch steps on (x, y) from theta; differentiable in theta and alpha when
        ``create_graph``, otherwise each step starts a new leaf (first order)."""
        phi = theta
        for _ in range(self.params.inner_steps):
            _, g = self.fn.grad(phi, x, y, create_graph=create_graph)
            with torch.set_grad_enabled(create_graph):
                if alpha is None:
                    phi = [p - self.params.alpha * gi for p, gi in zip(phi, g, strict=True)]
                else:
                    phi = [p - a * gi for p, a, gi in zip(phi, alpha, g, strict=True)]
            if not create_graph:
                phi = leaves(phi)
        return phi

    def split(self, client: Client) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the support and query sets of this round, from the client's generator."""
        n = client.num_train
        order = torch.randperm(n, generator=client.generator).to(client.data.y_train.device)
        n_support = min(max(int(round(self.params.support_fraction * n)), 1), n - 1)
        return order[:n_support], order[n_support:]

    def _augmented(self, x: torch.Tensor, client: Client) -> torch.Tensor:
        """The support or query inputs under ``data.augment`` (as they are when it is off)."""
        return x if self.setup.augment is None else self.setup.augment(x, client.generator)

    def meta_gradient(self, client: Client, payload: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The client's meta-gradient (flat, CPU, the uplink's layout) and its query loss."""
        if client.num_train < 2:
            raise ValueError(f"client {client.id} has {client.num_train} training samples; FedMeta needs 2")
        x, y = client.train
        support, query = self.split(client)
        theta, alpha = self._unpack(payload)
        first_order = self.params.variant == "fomaml"
        x_support, x_query = self._augmented(x[support], client), self._augmented(x[query], client)
        phi = self.adapt(theta, alpha, x_support, y[support], create_graph=not first_order)
        loss = self.fn.loss(phi, x_query, y[query])
        wrt = phi if first_order else theta + (alpha or [])
        grads = torch.autograd.grad(loss, wrt)
        return self.fn.flatten(grads), float(loss.detach())

    def client_update(self, client: Client, payload: torch.Tensor) -> Update:
        grad, loss = self.meta_gradient(client, payload)
        return Update(grad, client_weight(self.params.weighting, client), {"train_loss": loss})

    def load_for_eval(self, client: Client, payload: torch.Tensor) -> None:
        theta, alpha = self._unpack(payload)
        self.fn.load(self.adapt(theta, alpha, *client.train, create_graph=False))

    def serve_novel(self, client: Client, payload: torch.Tensor, budget) -> None:
        """As every client: theta after its own ``inner_steps`` on the training split (not the budget's)."""
        self.load_for_eval(client, payload)
