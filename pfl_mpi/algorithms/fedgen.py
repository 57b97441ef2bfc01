"""FedGen (Zhu, Hong and Zhou, ICML 2021, "Data-Free Knowledge Distillation for Heterogeneous Federated Learning").

A global model w trained as in FedAvg, plus a lightweight generator G(z, y) on the server that maps noise z and a
label y to a point of the model's feature space (the output of the SplitModel's ``base``, ``model.feature_dim``
values). The server fits G so that the clients' classifier heads h_k, weighted per label by the clients' label
counts, predict y from G(z, y); the clients then use G to regularise their local training with the knowledge of
every other client, without any proxy data set.

Moves, per round with K sampled clients, a model of d parameters, C classes and a generator of g values:

- down, Broadcast: [w, G], the global model and the generator: its parameters and its BatchNorm running mean and
  variance, which its evaluation-mode forward on the clients needs (4 (d + g) bytes per worker rank).
- up, Gathered: [w_k, n_k], each sampled client's trained model and its C training label counts as float32
  (4 (d + C) bytes per client). It is a Gatherv, not a Reduce: fitting G needs every client's head h_k separately.
  A cheaper split (a Reduce of the bodies, one body per rank, and a Gatherv of heads and counts only) needs two
  uplinks, which the algorithm interface does not have.

Computes, on the server (``aggregate``, round t, clients sorted by id so that the result does not depend on the
ranks): the label weights alpha_k^y = n_k^y / sum_j n_j^y over the clients of the round, and the label
distribution p_t(y) proportional to sum_k n_k^y; then ``(ensemble_epochs // n_teacher_iters) * n_teacher_iters``
Adam steps (50 with the defaults) on G, each on ``generator_batch_size`` labels y ~ p_t with noise z ~ U[0, 1)
of ``noise_dim`` values:

    teacher   = sum_k mean_b alpha_k^{y_b} CE(h_k(G(z_b, y_b)), y_b)
    diversity = exp(-mean_{b,c} ||z_b - z_c||^2 / noise_dim * |G(z_b, y_b) - G(z_c, y_c)|_1 / feature_dim)
    loss      = ensemble_alpha * teacher + ensemble_eta * diversity

with Adam's learning rate ``ensemble_lr * ensemble_lr_decay^t`` and L2 ``weight_decay``. Then w moves as in
FedAvg: w <- server_opt(w, sum_k p_k (w_k - w)), p_k by ``weighting`` (sample counts by default, as in the paper).

On a client (``client_update``): w and G are loaded (G in evaluation mode, fixed), and the client runs the same
minibatch SGD as FedAvg (same batches, same step rule, ``train`` section) on, for each batch (x, y) of size B,

    CE(f(x), y) + (gen_batch_size / B) alpha_t CE(h(G(z', y~)), y~) + beta_t KL(softmax h(G(z, y)) || softmax f(x))

where y~ are ``gen_batch_size`` labels drawn from the population's label distribution (``Setup.label_distribution``,
the paper's p(y)), the softmax target of the last term is held constant, and the weights decay per round as in the
authors' code: alpha_t = max(1e-4, generative_alpha * generative_decay^t), likewise beta_t (a weight set to 0 stays
0). The regulariser is on from the second round (the generator has then been fitted once) and for the first
``early_stop`` local epochs. The batches come from ``client.generator`` exactly as FedAvg draws them; the noise and
the labels y~ come from a second generator seeded from ``client.generator.initial_seed()``, so with
generative_alpha = generative_beta = 0 a client computes exactly FedAvg's local update.

Choices, where the authors' code (zhuangdizhu/FedGen) and this file differ:

- Label counts are the client's exact training label counts. The code counts the labels of the batches it happened
  to draw, each label starting at 1; the paper defines alpha_k^y from the local label counts.
- The teacher term is the alpha-weighted sum of the clients' losses, as in the code (not the loss of a weighted
  average of logits), with alpha_k^{y_b} weighting sample b. In the code the losses [B] times the weights [B, 1]
  broadcast to [B, B], so each client's term there is mean_b(alpha_k^{y_b}) * mean_b(CE_b): the per-sample
  weighting is lost. The code's adversarial student term (ensemble_beta, 0 in every published configuration) is
  not implemented.
- The server draws y from p_t (the labels of the round's clients, by count), the code uniformly among the labels
  some client of the round holds. The clients draw y~ from p(y), the code uniformly among all labels.
- Local training is the project's (``train``: epochs over the client's data, its lr, momentum and weight decay);
  the code's per-round decay of the clients' learning rate is not reproduced.
- The generator is the code's (one-hot label, one hidden layer with BatchNorm and ReLU, uniform noise); its output
  size is ``model.feature_dim``, so the feature space is set by ``model.head_layers`` (the code generates the input
  of its last layer: ``head_layers: 1``). The client-side generator in evaluation mode uses the BatchNorm running
  statistics that come down with it, as the code's clients do.

Evaluation uses the global w (FedGen trains one global model).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.func import functional_call

from ..models.feature_generator import FeatureGenerator, diversity_loss, label_weights
from ..models.params import ParamLayout
from ..seeding import derive_seed
from .base import Broadcast, Client, Collected, Gathered, Phase, Setup, Update
from .fedavg import FedAvg, FedAvgParams
from .registry import register
from .training import Batch
from .weighting import client_weight

_GENERATOR_INIT = 0x4647  # stream tag of the generator's initialisation
_SERVER_STEPS = 0x4653  # stream tag of the server's labels and noise, per round
_CLIENT_NOISE = 0x4643  # stream tag of a client's generator noise and sampled labels
MIN_REGULARISER_WEIGHT = 1e-4  # floor of the decayed alpha_t and beta_t (the authors' exp_lr_scheduler)


class FedGenParams(FedAvgParams):
    generative_alpha: float = Field(
        10.0, ge=0, description="alpha: weight of the clients' CE on generated features (the code's MNIST value)"
    )
    generative_beta: float = Field(
        10.0,
        ge=0,
        description="beta: weight of the clients' distillation of h(G(z, y)) into their prediction on real x "
        "(the code's MNIST value; 0 turns the term off)",
    )
    generative_decay: float = Field(
        0.98, gt=0, le=1, description="alpha_t = max(1e-4, alpha * decay^t), likewise beta_t"
    )
    gen_batch_size: int = Field(32, ge=1, description="generated samples per client minibatch")
    early_stop: int = Field(20, ge=0, description="the clients use the generator in their first early_stop epochs")
    ensemble_lr: float = Field(3e-4, gt=0, description="Adam learning rate of the generator (the code's MNIST value)")
    ensemble_lr_decay: float = Field(
        0.98, gt=0, le=1, description="the generator's learning rate is multiplied by this after every round"
    )
    weight_decay: float = Field(1e-2, ge=0, description="L2 weight decay of the generator's Adam")
    ensemble_epochs: int = Field(
        50, ge=1, description="with n_teacher_iters: (ensemble_epochs // n_teacher_iters) * n_teacher_iters steps"
    )
    n_teacher_iters: int = Field(5, ge=1, description="generator steps per server epoch")
    ensemble_alpha: float = Field(1.0, ge=0, description="weight of the teacher (ensemble CE) loss of the generator")
    ensemble_eta: float = Field(1.0, ge=0, description="weight of the generator's diversity loss")
    generator_batch_size: int = Field(
        32, ge=2, description="labels per generator step (the code passes the clients' batch size, 32)"
    )
    hidden_dim: int = Field(256, ge=1, description="width of the generator's hidden layer (the code's MNIST value)")
    noise_dim: int = Field(32, ge=1, description="size of the generator's noise z (the code's MNIST value)")

    @model_validator(mode="after")
    def _at_least_one_step(self) -> FedGenParams:
        if self.ensemble_epochs < self.n_teacher_iters:
            raise ValueError(f"ensemble_epochs ({self.ensemble_epochs}) must be >= n_teacher_iters")
        return self

    @property
    def generator_steps(self) -> int:
        """Adam steps on the generator per round."""
        return (self.ensemble_epochs // self.n_teacher_iters) * self.n_teacher_iters


def decayed(weight: float, decay: float, round: int) -> float:
    """The regulariser weight of round ``round``: max(1e-4, weight * decay^round), and 0 when ``weight`` is 0."""
    return max(MIN_REGULARISER_WEIGHT, weight * decay**round) if weight > 0 else 0.0


def noise_generator(client: Client) -> torch.Generator:
    """The client's stream of generator noise and sampled labels, beside (not from) its batch stream."""
    return torch.Generator().manual_seed(derive_seed(client.generator.initial_seed(), _CLIENT_NOISE))


@register
class FedGen(FedAvg):
    name = "fedgen"
    Params = FedGenParams
    down = Broadcast()
    up = Gathered()
    client_metrics = ("train_loss", "synthetic_loss", "latent_loss")

    def __init__(self, params: FedGenParams, setup: Setup):
        super().__init__(params, setup)
        if self.personal_layout.numel:
            raise ValueError("FedGen shares the whole model")
        model = setup.model
        self.head_names = [n for n in self.shared.names if n.startswith("head.")]
        if not self.head_names or not hasattr(model, "feature_dim"):
            raise ValueError("FedGen needs a model split into base and head (a SplitModel)")
        first = self.shared.names.index(self.head_names[0])
        if list(self.shared.names[first:]) != self.head_names:
            raise ValueError("FedGen expects the head's parameters after the base's")
        self.head_layout = ParamLayout(model, self.head_names)
        self.head_start = sum(self.shared.numels[:first])  # where the head begins in a flat model
        # the clients' copy of G: loaded from every downlink, always in evaluation mode
        self.client_gen = self._new_generator().to(setup.device).eval()

    def _new_generator(self) -> FeatureGenerator:
        p, s = self.params, self.setup
        init = torch.Generator().manual_seed(derive_seed(s.seed, _GENERATOR_INIT))
        return FeatureGenerator(s.num_classes, s.model.feature_dim, p.noise_dim, p.hidden_dim, init)

    def down_numel(self) -> int:
        return self.shared.numel + self.client_gen.numel

    def up_numel(self) -> int:
        return self.shared.numel + self.setup.num_classes

    # -- server ---------------------------------------------------------------------------
    def init_server(self) -> None:
        super().init_server()
        p = self.params
        self.generator = self._new_generator()  # on the CPU, as rank 0 is
        self.gen_optimizer = torch.optim.Adam(
            self.generator.parameters(), lr=p.ensemble_lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=p.weight_decay
        )
        self.server_head = copy.deepcopy(self.setup.model.head).cpu().eval()

    def downlink(self, round: int, clients: list[int], phase: Phase) -> torch.Tensor:
        return torch.cat([self.w, self.generator.flat()])

    def heads(self, models: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Each row's head parameters, named as in ``model.head`` (for ``functional_call``)."""
        out = []
        for row in models:
            flat = row[self.head_start : self.head_start + self.head_layout.numel]
            chunks = flat.split(self.head_layout.numels)
            out.append(
                {
                    n.removeprefix("head."): c.view(shape)
                    for n, c, shape in zip(self.head_names, chunks, self.head_layout.shapes, strict=True)
                }
            )
        return out

    def aggregate(self, round: int, up: Collected) -> dict[str, float]:
        payloads, weights = up.payloads.float(), up.weights.double()  # rows in client-id order
        d = self.shared.numel
        models, counts = payloads[:, :d], payloads[:, d:]
        metrics = self.train_generator(round, models, counts)

        total = float(weights.sum())
        delta = ((models.double() - self.w.double()) * weights[:, None]).sum(dim=0) / total if total else None
        mean = delta.float() if delta is not None else torch.zeros_like(self.w)
        self.optimizer.step(self.w, mean)
        return {"update_norm": float(mean.norm()), **metrics}

    def train_generator(self, round: int, models: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
        """Fit G to the label-weighted heads of ``models`` (rows, with their ``counts``); return mean losses."""
        p = self.params
        alpha = label_weights(counts).float()  # [K, C]
        totals = counts.double().sum(dim=0)
        if float(totals.sum()) <= 0:  # no client of the round holds a training sample: nothing to fit
            return dict.fromkeys(("generator_teacher_loss", "generator_diversity_loss", "ensemble_acc"), 0.0)
        distribution = (totals / totals.sum()).float()
        heads = self.heads(models)
        rng = torch.Generator().manual_seed(derive_seed(self.setup.seed, _SERVER_STEPS, round))
        for group in self.gen_optimizer.param_groups:
            group["lr"] = p.ensemble_lr * p.ensemble_lr_decay**round
        self.generator.train()
        sums = torch.zeros(3, dtype=torch.float64)
        for _ in range(p.generator_steps):
            y = torch.multinomial(distribution, p.generator_batch_size, replacement=True, generator=rng)
            z = torch.rand(p.generator_batch_size, p.noise_dim, generator=rng)
            features = self.generator(z, y)
            teacher, ensemble_logits = torch.zeros(()), torch.zeros(())
            for k, head in enumerate(heads):
                logits = functional_call(self.server_head, head, (features,))
                weight = alpha[k, y]
                teacher = teacher + (weight * F.cross_entropy(logits, y, reduction="none")).mean()
                ensemble_logits = ensemble_logits + weight[:, None] * logits.detach()
            diversity = diversity_loss(z, features)
            loss = p.ensemble_alpha * teacher + p.ensemble_eta * diversity
            self.gen_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.gen_optimizer.step()
            accuracy = (ensemble_logits.argmax(dim=1) == y).double().mean()
            sums += torch.stack([teacher.detach().double(), diversity.detach().double(), accuracy])
        self.generator.eval()
        teacher, diversity, accuracy = (sums / p.generator_steps).tolist()
        return {"generator_teacher_loss": teacher, "generator_diversity_loss": diversity, "ensemble_acc": accuracy}

    def server_state(self) -> dict[str, torch.Tensor]:
        adam = self.gen_optimizer.state_dict()["state"]  # empty before the generator's first step
        return {**super().server_state(), "generator": self.generator.flat(), "generator_adam": adam}

    def load_server_state(self, state: dict) -> None:
        super().load_server_state(state)
        self.generator.load_flat(state["generator"].reshape(-1))
        groups = self.gen_optimizer.state_dict()["param_groups"]  # configuration, not state
        self.gen_optimizer.load_state_dict({"state": state.get("generator_adam", {}), "param_groups": groups})

    def global_state(self) -> dict[str, torch.Tensor]:
        return {"shared": self.w, "generator": self.generator.flat()}

    # -- client ---------------------------------------------------------------------------
    def _load(self, client: Client, payload: torch.Tensor) -> None:
        self.shared.load(self.setup.model_for(client.id), payload[: self.shared.numel])

    def load_for_eval(self, client: Client, payload: torch.Tensor) -> None:
        self._load(client, payload)

    def client_update(self, client: Client, payload: torch.Tensor) -> Update:
        self._load(client, payload)
        self.client_gen.load_flat(payload[self.shared.numel :])
        losses = self.train_with_generator(client)
        model = self.setup.model_for(client.id)
        counts = torch.bincount(client.data.y_train.reshape(-1).cpu(), minlength=self.setup.num_classes)
        up = torch.cat([self.shared.flatten(model), counts.to(torch.float32)])
        return Update(up, client_weight(self.params.weighting, client, self.setup), losses)

    def train_with_generator(self, client: Client) -> dict[str, float]:
        """The library loop on FedAvg's CE plus FedGen's two regularisers; the mean losses over the batches."""
        p, batch_size = self.params, self.setup.train.batch_size
        alpha = decayed(p.generative_alpha, p.generative_decay, client.round) if client.round > 0 else 0.0
        beta = decayed(p.generative_beta, p.generative_decay, client.round) if client.round > 0 else 0.0
        noise = noise_generator(client)
        labels = self.setup.label_distribution.to("cpu", torch.float32)

        def loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            logits = model(batch.x)
            ce = F.cross_entropy(logits, batch.y)
            objective, device = ce, batch.x.device
            synthetic = latent = torch.zeros((), device=device)
            regularise = batch.epoch < p.early_stop
            if regularise and beta > 0:
                with torch.no_grad():
                    z = torch.rand(len(batch.idx), p.noise_dim, generator=noise).to(device)
                    target = F.softmax(model.head(self.client_gen(z, batch.y)), dim=1)
                latent = F.kl_div(F.log_softmax(logits, dim=1), target, reduction="batchmean")
                objective = objective + beta * latent
            if regularise and alpha > 0:
                y_gen = torch.multinomial(labels, p.gen_batch_size, replacement=True, generator=noise)
                z = torch.rand(p.gen_batch_size, p.noise_dim, generator=noise)
                y_gen, z = y_gen.to(device), z.to(device)
                with torch.no_grad():
                    features = self.client_gen(z, y_gen)
                synthetic = F.cross_entropy(model.head(features), y_gen)
                objective = objective + (p.gen_batch_size / batch_size) * alpha * synthetic
            metrics = {"train_loss": ce, "synthetic_loss": synthetic, "latent_loss": latent}
            return objective, {k: v.double() for k, v in metrics.items()}

        means = self.local_training(client, loss=loss)
        return {k: means[k] for k in ("train_loss", "synthetic_loss", "latent_loss")}
