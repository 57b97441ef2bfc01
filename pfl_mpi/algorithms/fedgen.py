"""FedGen (Zhu, Hong and Zhou, ICML 2021, "Data-Free Knowledge Distillation for Heterogeneous Federated Learning").

A global model w trained as in FedAvg, plus a generator G(z, y) on the server (``models/feature_generator.py``) that
maps noise and a label to the model's feature space; the server fits G so that the clients' heads, weighted per
label by their label counts, predict y from G(z, y), and the clients regularise their local training with it.

Moves: down, Broadcast [w, G] (G's parameters and BatchNorm statistics); up, Gathered [w_k, n_k] (each client's
trained model and its C label counts: fitting G needs every head).

Computes: server (``aggregate``): ``generator_steps`` Adam steps on G against the label-weighted heads of the round
(teacher CE plus a diversity term), then w moves as in FedAvg. Client: FedAvg's local training (the library loop,
``train`` section) on CE(f(x), y) + (gen_batch_size / B) alpha_t CE(h(G(z', y~)), y~) + beta_t KL(h(G(z, y)) || f(x)),
from the second round and for the first ``early_stop`` epochs; alpha_t and beta_t decay per round.

The formulas, the streams of noise and labels, and where this departs from the authors' code (label counts,
the teacher term's weighting, label sampling, local training, the generator's layers): docs/algorithms.md#fedgen.
Over 150 lines: three computations (FedAvg's w, the server's fit of G, the clients' two regularisers) and the
paper's fifteen parameters; G, its fit (GeneratorFit) and the head's slice of w are models/feature_generator.py's.
Not batched (``train.client_batch``): clients train one after another (its loss adds the generator's samples).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..models.feature_generator import FeatureGenerator, FlatHead, GeneratorFit, label_weights
from ..models.split import require_base_head
from ..seeding import derive_seed
from ..training.loop import Batch
from .base import Client, Collected, Gathered, Phase, Setup, Update
from .fedavg import FedAvgParams
from .registry import register
from .shared_model import SharedModelAlgorithm
from .weighting import client_weight

_GENERATOR_INIT = 0x4647  # stream tag of the generator's initialisation
_SERVER_STEPS = 0x4653  # stream tag of the server's labels and noise, per round
_CLIENT_NOISE = 0x4643  # stream tag of a client's generator noise and sampled labels
MIN_REGULARISER_WEIGHT = 1e-4  # floor of the decayed alpha_t and beta_t (the authors' exp_lr_scheduler)


class FedGenParams(FedAvgParams):
    """The authors' MNIST values, except where noted; the formulas: docs/algorithms.md#fedgen."""

    generative_alpha: float = Field(10.0, ge=0, description="alpha: weight of the clients' CE on generated features")
    generative_beta: float = Field(10.0, ge=0, description="beta: weight of the clients' distillation (0: off)")
    generative_decay: float = Field(0.98, gt=0, le=1, description="alpha_t = max(1e-4, alpha decay^t), likewise beta")
    gen_batch_size: int = Field(32, ge=1, description="generated samples per client minibatch")
    early_stop: int = Field(20, ge=0, description="the clients use the generator in their first early_stop epochs")
    ensemble_lr: float = Field(3e-4, gt=0, description="Adam learning rate of the generator")
    ensemble_lr_decay: float = Field(0.98, gt=0, le=1, description="generator lr factor after every round")
    weight_decay: float = Field(1e-2, ge=0, description="L2 weight decay of the generator's Adam")
    ensemble_epochs: int = Field(50, ge=1, description="(ensemble_epochs // n_teacher_iters) * n_teacher_iters steps")
    n_teacher_iters: int = Field(5, ge=1, description="generator steps per server epoch")
    ensemble_alpha: float = Field(1.0, ge=0, description="weight of the generator's teacher (ensemble CE) loss")
    ensemble_eta: float = Field(1.0, ge=0, description="weight of the generator's diversity loss")
    generator_batch_size: int = Field(32, ge=2, description="labels per generator step (the code: the batch size)")
    hidden_dim: int = Field(256, ge=1, description="width of the generator's hidden layer")
    noise_dim: int = Field(32, ge=1, description="size of the generator's noise z")

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
class FedGen(SharedModelAlgorithm):
    name = "fedgen"
    own_loss = True  # its own cross-entropy: classification only, no train.loss
    Params = FedGenParams
    up = Gathered()
    client_metrics = ("train_loss", "synthetic_loss", "latent_loss")

    @classmethod
    def check_models(cls, params: FedGenParams, models: list[nn.Module]) -> None:
        require_base_head(models, cls.name)  # G samples the base's output space; the heads are fitted on it

    def __init__(self, params: FedGenParams, setup: Setup):
        super().__init__(params, setup)  # self.shared: w, moved as in FedAvg
        self.head = FlatHead(setup.model, self.shared.layout)
        # the clients' copy of G: loaded from every downlink, always in evaluation mode
        self.client_gen = self._new_generator().to(setup.device).eval()

    def _new_generator(self) -> FeatureGenerator:
        p, s = self.params, self.setup
        init = torch.Generator().manual_seed(derive_seed(s.seed, _GENERATOR_INIT))
        return FeatureGenerator(s.num_classes, s.model.feature_dim, p.noise_dim, p.hidden_dim, init)

    def down_numel(self) -> int:
        return self.shared.numel + self.client_gen.numel  # [w, G]

    def up_numel(self) -> int:
        return self.shared.numel + self.setup.num_classes  # [w_k, label counts]

    # -- server ---------------------------------------------------------------------------
    def init_server(self) -> None:
        super().init_server()
        p = self.params
        self.generator = self._new_generator()  # on the CPU, as rank 0 is
        fit = (p.ensemble_lr, p.ensemble_lr_decay, p.weight_decay)
        self.gen_fit = GeneratorFit(self.generator, self.setup.model.head, *fit)

    def downlink(self, round: int, clients: list[int], phase: Phase) -> torch.Tensor:
        return torch.cat([self.shared.w, self.generator.flat()])

    def aggregate(self, round: int, up: Collected) -> dict[str, float]:
        d, weights = self.shared.numel, up.weights.double()
        models = up.payloads[:, :d].float()
        metrics = self.train_generator(round, models, up.payloads[:, d:].float())
        total = float(weights.sum())  # one vectorised sum, not weighted_mean's row by row: FedGen's rounding since v1
        delta = ((models.double() - self.shared.w.double()) * weights[:, None]).sum(dim=0) / total if total else None
        return {**self.shared.step(delta.float() if total else torch.zeros(d)), **metrics}

    def train_generator(self, round: int, models: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
        """Fit G to the label-weighted heads of ``models`` (rows, with their ``counts``); return mean losses."""
        p, totals = self.params, counts.double().sum(dim=0)
        if float(totals.sum()) <= 0:  # no client of the round holds a training sample: nothing to fit
            return dict.fromkeys(("generator_teacher_loss", "generator_diversity_loss", "ensemble_acc"), 0.0)
        heads = [self.head.params(row) for row in models]
        rng = torch.Generator().manual_seed(derive_seed(self.setup.seed, _SERVER_STEPS, round))
        alpha, labels = label_weights(counts).float(), (totals / totals.sum()).float()
        fit = (p.generator_steps, p.generator_batch_size, p.ensemble_alpha, p.ensemble_eta)
        return self.gen_fit.fit(round, heads, alpha, labels, rng, *fit)

    def server_state(self) -> dict[str, torch.Tensor | dict]:
        return {**super().server_state(), **self.gen_fit.state()}

    def load_server_state(self, state: dict) -> None:
        super().load_server_state(state)
        self.gen_fit.load_state(state)

    def global_state(self) -> dict[str, torch.Tensor]:
        return {**super().global_state(), "generator": self.generator.flat()}

    # -- client ---------------------------------------------------------------------------
    def load_for_eval(self, client: Client, payload: torch.Tensor) -> None:
        self.shared.load(client, payload[: self.shared.numel])

    def client_update(self, client: Client, payload: torch.Tensor) -> Update:
        self.shared.load(client, payload[: self.shared.numel])
        self.client_gen.load_flat(payload[self.shared.numel :])
        losses = self.train_with_generator(client)
        counts = torch.bincount(client.data.y_train.reshape(-1).cpu(), minlength=self.setup.num_classes)
        up = torch.cat([self.shared.flatten(), counts.to(torch.float32)])
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
