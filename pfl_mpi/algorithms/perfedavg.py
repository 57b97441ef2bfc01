"""Per-FedAvg (Fallah, Mokhtari and Ozdaglar, NeurIPS 2020): MAML inside FedAvg.

Moves: the global model w goes down by Broadcast; each client's update w_k - w comes up as a WeightedSum
(uniform weights by default, the paper's 1/(rn) average); the server applies the mean update (FedOpt's
server SGD with lr 1 by default, i.e. w <- mean of the clients' models, as in the paper's Algorithm 1).

Computes, on a client, ``tau`` local steps from w, each on three minibatches D, D', D'' drawn in that
order from the client's training split with its generator (:class:`~pfl_mpi.algorithms.meta.BatchStream`,
``train.batch_size`` samples each):

    w~ = w - alpha grad f(w; D)                              (the inner, personalising step)
    u  = grad f(w~; D')
    FO: w <- w - beta u                                       (the Hessian term dropped)
    HF: w <- w - beta (u - alpha d),  d = grad^2 f(w; D'') u, the Hessian-vector product, computed by ``hvp``:

    exact:  by double backward (the gradient of <grad f(w; D''), u>; the default)
    scaled: [grad f(w + r u; D'') - grad f(w - r u; D'')] / (2 r) with r = delta / ||u||
    paper:  the same with r = delta, the paper's estimator

(meta.hvp_exact, meta.hvp_finite_difference). The paper's probes lie delta ||u|| from w: on a ReLU network with
a large u they cross kinks and the estimate can be off by its own size (docs/algorithms.md#per-fedavg).
(FO draws no D''.) ``meta_clip`` bounds the norm of the meta-gradient (u, or u - alpha d) before the beta step.
The reported ``train_loss`` is the mean over the steps of f(w~; D'), the meta-objective.

Evaluation personalises as the paper evaluates: from w, ``eval_steps`` steps w <- w - alpha grad f(w; D)
on minibatches of the client's training split (the whole split with ``eval_full_batch``), then the test.
Clients keep no state. ``data.augment`` applies to every minibatch drawn. Batched clients
(``train.client_batch``): not batched, clients train one after another: a meta-learning inner loop.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..training.optimizers import clip_grad_norm_
from .base import Client, Setup, Update, WeightedMean, WeightedSum
from .fedavg import FedAvgParams
from .meta import BatchStream, FunctionalModel, axpy, hvp_exact, hvp_finite_difference, leaves
from .registry import register
from .shared_model import SharedModelAlgorithm
from .weighting import client_weight


class PerFedAvgParams(FedAvgParams):
    variant: Literal["fo", "hf"] = Field(
        "hf", description="fo: first-order (gradient at w~ applied to w); hf: with the Hessian term (algorithm.hvp)"
    )
    alpha: float = Field(0.01, gt=0, description="inner (personalisation) step size alpha")
    beta: float = Field(0.001, gt=0, description="outer (meta) step size beta of each local step")
    tau: int = Field(10, ge=1, description="local steps per round (tau), each on fresh batches D, D', D''")
    hvp: Literal["exact", "scaled", "paper"] = Field(
        "exact",
        description="hf only: Hessian-vector product by double backward (exact), or a central difference with "
        "probes delta from w (scaled) or delta * ||u|| from w (paper, the paper's estimator)",
    )
    delta: float = Field(0.001, gt=0, description="hf with hvp scaled or paper: finite-difference step delta")
    meta_clip: float | None = Field(
        None, gt=0, description="largest L2 norm of a local step's meta-gradient (before beta); None: unclipped"
    )
    eval_steps: int = Field(1, ge=0, description="gradient steps with alpha on the training split before the test")
    eval_full_batch: bool = Field(
        False, description="evaluation steps on the whole training split instead of train.batch_size minibatches"
    )
    # quality and label_kl score the model loaded in setup.model; these steps are functional and never load it
    weighting: Literal["uniform", "samples"] = Field(
        "uniform", description="client weights: uniform (the paper) or by sample count"
    )


@register
class PerFedAvg(SharedModelAlgorithm):
    """FedAvg's server and messages; its own local steps and personalised evaluation."""

    name = "perfedavg"
    tuning_grid = {"algorithm.alpha": [0.05, 0.1], "algorithm.beta": [0.1, 0.3]}
    own_loss = True  # its own cross-entropy: classification only, no train.loss
    Params = PerFedAvgParams
    up = WeightedSum()
    evaluates_global = True  # w before the personalisation step
    replaces_train = {
        "lr": "algorithm.alpha and algorithm.beta",
        "local_epochs": "algorithm.tau",
        "optimizer": "Per-FedAvg's own steps (algorithm.variant)",
        "momentum": "Per-FedAvg's own steps (plain SGD)",
        "nesterov": "Per-FedAvg's own steps (plain SGD)",
        "weight_decay": "Per-FedAvg's own steps (no weight decay)",
        "clip_norm": "Per-FedAvg's own steps (unclipped)",
        "schedule": "algorithm.alpha and algorithm.beta",
    }

    def __init__(self, params: PerFedAvgParams, setup: Setup):
        super().__init__(params, setup)
        self.fn = FunctionalModel(setup.model)

    def up_numel(self) -> int:
        return self.shared.numel

    def aggregate(self, round: int, up: WeightedMean) -> dict[str, float]:
        return self.shared.step(up.mean)

    # -- client ---------------------------------------------------------------------------
    def local_step(self, w: list[torch.Tensor], batches: BatchStream) -> tuple[list[torch.Tensor], float]:
        """One Per-FedAvg local step from ``w`` (leaf tensors); returns the new w and f(w~; D')."""
        p, fn = self.params, self.fn
        x1, y1 = batches.next()
        x2, y2 = batches.next()
        _, g1 = fn.grad(w, x1, y1)
        w_tilde = leaves(axpy(-p.alpha, g1, w))
        meta_loss, u = fn.grad(w_tilde, x2, y2)
        if p.variant == "hf":
            x3, y3 = batches.next()
            if p.hvp == "exact":
                d = hvp_exact(fn, w, u, x3, y3)
            else:
                d = hvp_finite_difference(fn, w, u, x3, y3, p.delta, scaled=p.hvp == "scaled")
            with torch.no_grad():
                u = [ui - p.alpha * di for ui, di in zip(u, d, strict=True)]
        if p.meta_clip is not None:
            clip_grad_norm_(u, p.meta_clip)
        return leaves(axpy(-p.beta, u, w)), float(meta_loss.detach())

    def client_update(self, client: Client, payload: torch.Tensor) -> Update:
        batches = BatchStream(*client.train, self.setup.train.batch_size, client.generator, self.setup.augment)
        w = self.fn.unflatten(payload, self.setup.device)
        total = 0.0
        for _ in range(self.params.tau):
            w, loss = self.local_step(w, batches)
            total += loss
        delta = self.fn.flatten(w) - payload
        metrics = {"train_loss": total / self.params.tau}
        return Update(delta, client_weight(self.params.weighting, client), metrics)

    def personalise(self, client: Client, payload: torch.Tensor) -> list[torch.Tensor]:
        """w after ``eval_steps`` steps of size alpha on the client's training data (its state untouched)."""
        batches = BatchStream(*client.train, self.setup.train.batch_size, client.generator, self.setup.augment)
        w = self.fn.unflatten(payload, self.setup.device)
        for _ in range(self.params.eval_steps):
            _, g = self.fn.grad(w, *(client.train if self.params.eval_full_batch else batches.next()))
            w = leaves(axpy(-self.params.alpha, g, w))
        return w

    def load_for_eval(self, client: Client, payload: torch.Tensor) -> None:
        self.fn.load(self.personalise(client, payload))

    def serve_novel(self, client: Client, payload: torch.Tensor, budget) -> None:
        """A novel client is served as every client: w after its own ``eval_steps`` steps (not the budget's)."""
        self.load_for_eval(client, payload)

    def load_global_for_eval(self, client: Client, payload: torch.Tensor) -> None:
        self.shared.load(client, payload)  # w before the personalisation steps
