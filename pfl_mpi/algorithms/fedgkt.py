"""FedGKT (He, Annavaram and Avestimehr, NeurIPS 2020, "Group Knowledge Transfer: Federated Learning of Large
CNNs at the Edge").

Each client trains a small model of its own, the SplitModel of its architecture group: ``base`` is the feature
extractor, ``head`` the small classifier. The server trains a larger model on the extractors' features, and
knowledge travels both ways by distillation. No weights move, only per-sample features and logits: architectures
may differ between clients as long as every extractor gives features of one size d (``check_models``).

Moves, per round, for a client k with n_k training samples, C classes and features of d values (all float32):

- up, Gathered (Gatherv): n_k rows of [H_i (d), Z_i (C), y_i (1)], the features, the client's logits and the label
  of each training sample i in the order of its training split: 4 n_k (d + C + 1) bytes. The uplink grows with the
  client's data, not with its model; features of every sample are what FedGKT costs, and what the ledger counts.
- down, PerClient (Scatterv): [flag, S (n_k x C)], the server's logits on client k's features of the last round in
  which k trained, row i for training sample i; flag = 1 when the server has them, else 0 and S is zeros (a
  client's first round; the authors' client then trains on CE alone, as here): 4 (n_k C + 1) bytes. With
  ``alpha = 0`` the clients never use them, so nothing goes down (0 bytes; the authors' ``whether_distill_back``
  switched off).

The server model (a ReLU MLP of widths ``server_hidden`` from d to C), its optimiser state and its stored logits
live on rank 0 only and never move; they are its state for resume. Stored logits: ``logit_memory: all`` keeps, for
every client that has trained, the logits of the last round it took part in (4 C sum_k n_k bytes at most: C floats
per training sample of the whole federation, a C / (d + C + 1) share of one uplink of every client; this is what the
paper's protocol implies when not every client takes part in every round). ``last_round`` keeps only those of the
clients of the last round (at most one round's downlink): a client sampled after a gap trains without the KD term,
as in its first round. With every client in every round (the paper's setting) both are the same.

Computes, in round t:

- on client k (``client_update``): its model (client state: the whole model of its group) trains for
  ``train.local_epochs`` epochs (the authors' ``epochs_client``) of the project's minibatch SGD (``train`` section:
  the batches and step rule of ``training.sgd_epochs``) on CE(f(x_b), y_b) + alpha * KL_T(S_b || f(x_b)), where
  S_b are the rows of the server's logits for the batch's samples and KL_T(teacher || student) is
  T^2 * mean over the batch of KL(softmax(teacher / T) || softmax(student / T)) (the authors' ``KL_Loss``,
  ``batchmean``). Then, in evaluation mode, it computes H = base(x) and Z = head(H) of every training sample and
  sends [H, Z, y].
- on the server (``aggregate``): the rows of the round's clients, in client id order, are one training set of
  M = sum_k n_k samples; ``epochs_server`` epochs of minibatches of ``server_batch_size`` (one permutation per
  epoch from a stream of (seed, t)) on CE(g(H_b), y_b) + server_alpha * KL_T(Z_b || g(H_b)) with Adam (AMSGrad)
  or SGD (Nesterov momentum), as the authors' optimisers. Then, if alpha > 0, the trained g gives S_k = g(H_k) for
  each client of the round: what goes down to k when it is next sampled.

Choices, where the authors' code (FedML's fedgkt: GKTServerTrainer, GKTClientTrainer, utils.KL_Loss) differs:

- Server logits are those of the trained server model on each client's features, computed after the last epoch.
  The code keeps the outputs of its last epoch's batches, each computed before that batch's optimiser step.
- The server shuffles all samples of the round together; the code trains client after client, batch after batch
  in the clients' order. The rows carry per-sample logits, so the client may shuffle its batches freely (the code
  keys server logits by batch index, which needs unshuffled client data loaders).
- The server loss is CE + server_alpha * KL (CE + KL at the default 1, the project's summary of the paper's rule);
  the code weights CE instead (KL + alpha * CE) and only with ``whether_distill_on_the_server``, which is off by
  default (CE alone: ``server_alpha: 0`` here). The KL is computed exactly from log-softmaxes; the code adds 1e-7
  to the teacher probabilities.
- Clients use the project's SGD (``train``); the code uses its server optimiser (Adam, lr 1e-3, in the published
  runs) on both sides, and lowers the server's learning rate on a plateau of the server's test accuracy, which
  needs test features sent up too; neither is reproduced. The code's first round trains the clients on CE alone:
  the same here. Evaluation is each client's own model on its test split (the server model never leaves rank 0).
  The runtime's evaluation still sends every client its downlink payload (``eval_down``, the simulator's
  bookkeeping, not in ``bytes_down``): 4 (n_k C + 1) bytes per client per evaluation, which no client uses.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import ConfigError
from ..models.params import ParamLayout
from ..runtime.seeding import derive_seed
from .base import Algorithm, Client, Collected, Gathered, PerClient, Setup, Update
from .personal_models import PersonalModels
from .registry import register
from .training import sgd_step

_SERVER_INIT = 0x474B  # stream tag of the server model's initialisation
_SERVER_ORDER = 0x4753  # stream tag of the server's minibatch order, per round


class FedGKTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(
        1.0, ge=0, description="weight of the clients' KD term KL_T(server || client) (the code's --alpha, default 1)"
    )
    temperature: float = Field(3.0, gt=0, description="distillation temperature T (the code's default 3)")
    server_alpha: float = Field(
        1.0, ge=0, description="weight of the server's KD term KL_T(client || server) (the paper: 1; 0: CE only)"
    )
    epochs_server: int = Field(3, ge=1, description="server epochs per round over the round's features (code: 3)")
    server_batch_size: int = Field(64, ge=1, description="server minibatch size (the code's default batch size 64)")
    server_hidden: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [256, 256],
        description="widths of the server model's hidden Linear+ReLU layers (a ReLU MLP from d features to C)",
    )
    server_optimizer: Literal["adam", "sgd"] = Field(
        "adam", description="adam: Adam with AMSGrad (the code's Adam); sgd: SGD with Nesterov momentum"
    )
    server_lr: float = Field(1e-3, gt=0, description="server learning rate (the code's published runs: Adam, 1e-3)")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="sgd only: Nesterov momentum (the code's 0.9)")
    server_weight_decay: float = Field(1e-4, ge=0, description="L2 weight decay of the server optimiser (code: 1e-4)")
    logit_memory: Literal["all", "last_round"] = Field(
        "all",
        description="which server logits the server keeps to send: all (of every client's last round) or "
        "last_round (of the last round's clients only; others train without KD)",
    )


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over rows of KL(softmax(teacher / T) || softmax(student / T)); the gradient flows to ``student``."""
    log_p = F.log_softmax(teacher.detach() / temperature, dim=1)
    log_q = F.log_softmax(student / temperature, dim=1)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum() / max(student.shape[0], 1)


def server_model(feature_dim: int, hidden: list[int], num_classes: int, seed: int) -> nn.Sequential:
    """The server's ReLU MLP on the features, initialised (torch's default) from ``seed`` alone."""
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, _SERVER_INIT))
        width = feature_dim
        for w in hidden:
            layers += [nn.Linear(width, w), nn.ReLU()]
            width = w
        layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class ServerOptimizer:
    """The server's optimiser on a list of parameters, with its state as flat tensors (for resume).

    adam: torch's Adam with ``amsgrad=True`` and L2 ``weight_decay`` (the code's choice); sgd: torch's SGD with
    ``nesterov=True``, ``momentum`` and ``weight_decay``. Written out so that the state is explicit.
    """

    BETAS, EPS = (0.9, 0.999), 1e-8

    def __init__(self, params: list[nn.Parameter], p: FedGKTParams):
        self.params, self.kind, self.lr, self.wd = params, p.server_optimizer, p.server_lr, p.server_weight_decay
        self.momentum = p.server_momentum
        names = ("m", "v", "vmax") if self.kind == "adam" else ("momentum",)
        self.buffers = {n: [torch.zeros_like(q) for q in params] for n in names}
        self.steps = 0

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        self.steps += 1
        for i, (q, g) in enumerate(zip(self.params, grads, strict=True)):
            if self.wd:
                g = g.add(q, alpha=self.wd)
            if self.kind == "sgd":
                buf = self.buffers["momentum"][i]
                buf.mul_(self.momentum).add_(g)  # zero at first: torch's first buffer is g
                q.add_(g.add(buf, alpha=self.momentum), alpha=-self.lr)
                continue
            (b1, b2), m, v, vmax = self.BETAS, self.buffers["m"][i], self.buffers["v"][i], self.buffers["vmax"][i]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            torch.maximum(vmax, v, out=vmax)
            denom = (vmax.sqrt() / math.sqrt(1 - b2**self.steps)).add_(self.EPS)
            q.addcdiv_(m, denom, value=-self.lr / (1 - b1**self.steps))

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"opt_{n}": torch.cat([b.reshape(-1) for b in bufs]) for n, bufs in self.buffers.items()}
        return {**out, "opt_steps": torch.tensor([self.steps], dtype=torch.int64)}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        for n, bufs in self.buffers.items():
            flat = torch.as_tensor(state[f"opt_{n}"]).reshape(-1)
            for b, chunk in zip(bufs, flat.split([b.numel() for b in bufs]), strict=True):
                b.copy_(chunk.view_as(b))
        self.steps = int(torch.as_tensor(state["opt_steps"]).reshape(-1)[0])


@register
class FedGKT(Algorithm):
    name = "fedgkt"
    Params = FedGKTParams
    heterogeneous = True
    eval_payload = False  # clients evaluate their own models
    down = PerClient()
    up = Gathered()
    client_metrics = ("train_loss", "kd_loss")

    def __init__(self, params: FedGKTParams, setup: Setup):
        super().__init__(params, setup)
        self.check_models(params, setup.models)
        self.classes, self.dim = setup.num_classes, int(setup.models[0].feature_dim)
        self.personal = PersonalModels(setup)

    @classmethod
    def check_models(cls, params: BaseModel, models: list[torch.nn.Module]) -> None:
        dims = [int(m.feature_dim) for m in models]
        if len(set(dims)) > 1:
            sizes = ", ".join(f"architecture {g}: {d}" for g, d in enumerate(dims))
            raise ConfigError(
                "model.architectures", f"fedgkt's server model takes one feature size (base output), got {sizes}"
            )

    # -- sizes and state ------------------------------------------------------------------
    @property
    def row_width(self) -> int:
        """Values per training sample on the uplink: features, logits, label."""
        return self.dim + self.classes + 1

    def samples(self, client: int) -> int:
        return int(self.setup.train_sizes[client])

    def up_numel_of(self, client: int) -> int:
        return self.samples(client) * self.row_width

    def down_numel_of(self, client: int) -> int:
        return self.samples(client) * self.classes + 1 if self.params.alpha > 0 else 0

    def client_state_spec(self, group: int = 0) -> dict[str, int]:
        return {"model": self.personal.numel(group)}

    def init_client_state(self, client_id: int) -> dict[str, torch.Tensor]:
        return {"model": self.personal.initial_state(client_id)}

    # -- server ---------------------------------------------------------------------------
    def init_server(self) -> None:
        p = self.params
        self.server = server_model(self.dim, list(p.server_hidden), self.classes, self.setup.seed)
        self.server_params = list(self.server.parameters())
        self.server_layout = ParamLayout(self.server, [n for n, _ in self.server.named_parameters()])
        self.optimizer = ServerOptimizer(self.server_params, p)
        self.logits: dict[int, torch.Tensor] = {}  # client -> the server's logits on its features [n_k, C]

    def downlink(self, round: int, clients: list[int]) -> list[torch.Tensor]:
        if self.params.alpha == 0:
            return [torch.zeros(0) for _ in clients]
        out = []
        for k in clients:
            stored = self.logits.get(k)
            if stored is None:
                out.append(torch.zeros(self.down_numel_of(k)))
            else:
                out.append(torch.cat([torch.ones(1), stored.reshape(-1)]))
        return out

    def split_rows(self, row: torch.Tensor, client: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features [n_k, d], client logits [n_k, C], labels [n_k]) of one client's uplink."""
        rows = row.reshape(self.samples(client), self.row_width)
        d, c = self.dim, self.classes
        return rows[:, :d], rows[:, d : d + c], rows[:, d + c].round().long()

    def aggregate(self, round: int, up: Collected) -> dict[str, float]:
        order = sorted(range(len(up.clients)), key=lambda i: up.clients[i])  # client id order: rank-independent
        clients = [int(up.clients[i]) for i in order]
        parts = [self.split_rows(up.rows[i], k) for i, k in zip(order, clients, strict=True)]
        features, teacher, labels = (torch.cat([part[j] for part in parts]) for j in range(3))
        metrics = self.train_server(round, features, teacher, labels)
        if self.params.logit_memory == "last_round":
            self.logits.clear()
        if self.params.alpha > 0:
            with torch.no_grad():
                self.server.eval()
                for k, (h, _, _) in zip(clients, parts, strict=True):
                    self.logits[k] = self.server(h).contiguous()
        metrics["uplink_samples"] = float(labels.numel())
        return metrics

    def train_server(
        self, round: int, features: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, float]:
        """``epochs_server`` epochs of the server model on (features, client logits, labels); the last epoch's mean
        CE and KD per batch, and the trained model's accuracy on these features."""
        p, n = self.params, labels.numel()
        generator = torch.Generator().manual_seed(derive_seed(self.setup.seed, _SERVER_ORDER, round))
        self.server.train()
        ce_sum, kd_sum, batches = 0.0, 0.0, 0
        for _ in range(p.epochs_server):
            order = torch.randperm(n, generator=generator)
            ce_sum, kd_sum, batches = 0.0, 0.0, 0
            for start in range(0, n, p.server_batch_size):
                idx = order[start : start + p.server_batch_size]
                out = self.server(features[idx])
                ce = F.cross_entropy(out, labels[idx])
                kd = kd_loss(out, teacher[idx], p.temperature)
                loss = ce + p.server_alpha * kd if p.server_alpha else ce
                self.optimizer.step(list(torch.autograd.grad(loss, self.server_params)))
                ce_sum, kd_sum, batches = ce_sum + float(ce.detach()), kd_sum + float(kd.detach()), batches + 1
        with torch.no_grad():
            self.server.eval()
            acc = float((self.server(features).argmax(dim=1) == labels).float().mean()) if n else 0.0
        return {"server_loss": ce_sum / max(batches, 1), "server_kd_loss": kd_sum / max(batches, 1), "server_acc": acc}

    def server_state(self) -> dict[str, torch.Tensor]:
        ids = sorted(self.logits)
        logits = torch.cat([self.logits[k].reshape(-1) for k in ids]) if ids else torch.zeros(0)
        return {
            "server_model": self.server_layout.flatten(self.server),
            **self.optimizer.state(),
            "logit_clients": torch.tensor(ids, dtype=torch.int64),
            "logits": logits,
        }

    def load_server_state(self, state: dict[str, torch.Tensor]) -> None:
        self.server_layout.load(self.server, torch.as_tensor(state["server_model"]))
        self.optimizer.load(state)
        ids = [int(k) for k in torch.as_tensor(state["logit_clients"]).reshape(-1)]
        sizes = [self.samples(k) * self.classes for k in ids]
        chunks = torch.as_tensor(state["logits"]).reshape(-1).split(sizes)
        self.logits = {k: c.reshape(-1, self.classes).clone() for k, c in zip(ids, chunks, strict=True)}

    def global_state(self) -> dict[str, torch.Tensor]:
        return {"server_model": self.server_layout.flatten(self.server)}

    # -- client ---------------------------------------------------------------------------
    def server_logits(self, client: Client, payload: torch.Tensor) -> torch.Tensor | None:
        """The server's logits [n_k, C] in a client's payload, or None when it has none (or alpha = 0)."""
        if payload.numel() == 0 or float(payload[0]) == 0:
            return None
        return payload[1:].reshape(client.num_train, self.classes)

    def client_update(self, client: Client, payload: torch.Tensor) -> Update:
        model = self.personal.load(client)
        teacher = self.server_logits(client, payload)
        ce, kd = self.train_client(client, model, teacher)
        self.personal.save(client, model)
        return Update(
            self.client_rows(model, *client.train), float(client.num_train), {"train_loss": ce, "kd_loss": kd}
        )

    def train_client(self, client: Client, model: torch.nn.Module, teacher: torch.Tensor | None) -> tuple[float, float]:
        """SGD epochs on CE + alpha * KL_T(server logits || client logits); (mean CE, mean KD) per batch.

        Batches and step are those of ``training.sgd_epochs`` (one permutation per epoch from the client's
        generator; weight decay, then momentum), so without server logits or with alpha = 0 this is ``local``.
        """
        cfg, alpha, temperature = self.setup.train, self.params.alpha, self.params.temperature
        params = self.setup.params_for(client.id)
        x, y = client.train
        use_kd = teacher is not None and alpha > 0
        teacher = teacher.to(x.device) if use_kd else None
        model.train()
        momentum = [torch.zeros_like(q) for q in params] if cfg.momentum else None
        ce_total, kd_total, batches = torch.zeros((), device=x.device), torch.zeros((), device=x.device), 0
        for _ in range(cfg.local_epochs):
            order = torch.randperm(x.shape[0], generator=client.generator).to(x.device)
            for start in range(0, x.shape[0], cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                out = model(x[idx])
                ce = F.cross_entropy(out, y[idx])
                objective = ce
                if use_kd:
                    kd = kd_loss(out, teacher[idx], temperature)
                    objective = ce + alpha * kd
                    kd_total += kd.detach()
                sgd_step(params, torch.autograd.grad(objective, params), cfg, momentum)
                ce_total += ce.detach()
                batches += 1
        return float(ce_total) / max(batches, 1), float(kd_total) / max(batches, 1)

    @torch.no_grad()
    def client_rows(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> torch.Tensor:
        """The uplink: one row [base(x_i), head(base(x_i)), y_i] per sample, in order, flat float32 on the CPU."""
        model.eval()
        rows = []
        for start in range(0, x.shape[0], batch):
            features = model.base(x[start : start + batch])
            labels = y[start : start + batch].to(features.dtype)[:, None]
            rows.append(torch.cat([features, model.head(features), labels], dim=1))
        out = torch.cat(rows) if rows else torch.zeros(0, self.row_width)
        return out.reshape(-1).to(device="cpu", dtype=torch.float32)

    def load_for_eval(self, client: Client, payload: None) -> None:
        self.personal.load(client)
