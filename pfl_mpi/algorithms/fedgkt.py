"""FedGKT (He, Annavaram and Avestimehr, NeurIPS 2020, "Group Knowledge Transfer: Federated Learning of Large
CNNs at the Edge"): small client models and a large server model teach each other by distillation.

Moves (float32): up, Gathered: a row [H_i, Z_i, y_i] per training sample of client k (features, client logits,
label), then (``server_test``) a row [H_j, y_j] per test sample; down, PerClient: [flag, S_k], the server's logits
on k's features of its last round (flag 0: none yet). Computes: client k trains its own model (its state) on
CE + alpha KL_T(S_k || f(x)); the server trains its model (``models/fedgkt_server.py``) on the round's rows with
CE + server_alpha KL_T(Z || g(H)), keeps g(H_k), and scores g on the test rows (``server_test_acc``, the paper's
accuracy; ``test_acc`` is the clients' own small models).
Departs from the authors' code (FedML) in when server logits are computed, the server's shuffling, its loss
weights and the clients' optimiser: docs/algorithms.md#fedgkt, with the full design.
Not batched (``train.client_batch``): clients train one after another (a distillation loss).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from ..errors import ConfigError
from ..models.fedgkt_server import feature_rows, server_mlp, server_optimizer, split_rows
from ..models.params import ParamLayout
from ..models.split import require_base_head
from ..seeding import derive_seed
from ..training.loop import Batch, LossFn, TorchOptimizer, local_training
from .base import Algorithm, Client, Collected, Gathered, PerClient, Phase, Setup, Update
from .personal_models import PersonalModels
from .registry import register

_SERVER_INIT = 0x474B  # stream tag of the server model's initialisation
_SERVER_ORDER = 0x4753  # stream tag of the server's minibatch order, per round


class FedGKTParams(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")
    alpha: float = Field(1.0, ge=0, description="weight of the clients' KD term KL_T(server || client) (code: 1)")
    temperature: float = Field(3.0, gt=0, description="distillation temperature T (the code's default 3)")
    server_alpha: float = Field(1.0, ge=0, description="weight of the server's KD term KL_T(client || server); 0: CE")
    epochs_server: int = Field(3, ge=1, description="server epochs per round over the round's features (code: 3)")
    server_batch_size: int = Field(64, ge=1, description="server minibatch size (the code's default batch size 64)")
    server_hidden: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [256, 256], description="hidden widths of the server's ReLU MLP from d features to C"
    )
    server_optimizer: Literal["adam", "sgd"] = Field("adam", description="adam (AMSGrad, the code's) or Nesterov sgd")
    server_lr: float = Field(1e-3, gt=0, description="server learning rate (the code's published runs: Adam, 1e-3)")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="sgd only: Nesterov momentum (the code's 0.9)")
    server_weight_decay: float = Field(1e-4, ge=0, description="L2 weight decay of the server optimiser (code: 1e-4)")
    logit_memory: Literal["all", "last_round"] = Field(
        "all", description="server logits kept to send: of every client's last round (all), or of the last round's"
    )
    server_test: bool = Field(
        True, description="clients also send [H, y] of their test samples; the server scores g on them (server_test_*)"
    )


@register
class FedGKT(Algorithm):
    name = "fedgkt"
    own_loss = True  # its own cross-entropy: classification only, no train.loss
    Params = FedGKTParams
    heterogeneous = True
    down = PerClient()  # [flag, the server's logits on the client's features]
    up = Gathered()  # [features, logits, label] per training sample
    client_metrics = ("train_loss", "kd_loss")

    def __init__(self, params: FedGKTParams, setup: Setup):
        super().__init__(params, setup)
        self.classes, self.dim = setup.num_classes, int(setup.models[0].feature_dim)
        self.personal = PersonalModels(setup)
        self.samples = [int(n) for n in setup.train_sizes]  # training samples per client: rows up, logits down
        self.tests = [int(n) for n in setup.test_sizes] if params.server_test else [0] * setup.num_clients

    @classmethod
    def check_models(cls, params: BaseModel, models: list[torch.nn.Module]) -> None:
        require_base_head(models, cls.name)
        dims = [int(m.feature_dim) for m in models]
        if len(set(dims)) > 1:
            sizes = ", ".join(f"architecture {g}: {d}" for g, d in enumerate(dims))
            raise ConfigError("model.architectures", f"fedgkt needs one feature size (base output), got {sizes}")

    # -- sizes and state ------------------------------------------------------------------
    def up_numel_of(self, client: int) -> int:
        return self.samples[client] * (self.dim + self.classes + 1) + self.tests[client] * (self.dim + 1)

    def down_numel_of(self, client: int) -> int:
        return self.samples[client] * self.classes + 1 if self.params.alpha > 0 else 0

    def client_state_spec(self, group: int) -> dict[str, int]:
        return {"model": self.personal.numel(group)}

    def init_client_state(self, client_id: int) -> dict[str, torch.Tensor]:
        return {"model": self.personal.initial_state(client_id)}

    # -- server ---------------------------------------------------------------------------
    def init_server(self) -> None:
        p = self.params
        self.server = server_mlp(self.dim, p.server_hidden, self.classes, derive_seed(self.setup.seed, _SERVER_INIT))
        self.server_layout = ParamLayout(self.server, [n for n, _ in self.server.named_parameters()])
        params, wd = list(self.server.parameters()), p.server_weight_decay
        self.server_opt = server_optimizer(params, p.server_optimizer, p.server_lr, wd, p.server_momentum)
        self.server_step = TorchOptimizer(self.server_opt, params)  # the library loop's ``step(grads)`` on it
        self.logits: dict[int, torch.Tensor] = {}  # client -> the server's logits on its features [n_k, C]

    def downlink(self, round: int, clients: list[int], phase: Phase) -> list[torch.Tensor]:
        out = []
        for k in clients:  # [1, S_k] when the server has logits for k, else zeros (flag 0; nothing when alpha = 0)
            s = self.logits.get(k)
            out.append(torch.zeros(self.down_numel_of(k)) if s is None else torch.cat([torch.ones(1), s.flatten()]))
        return out

    def aggregate(self, round: int, up: Collected) -> dict[str, float]:
        """Train g on the round's rows (in client id order); score it on them and on the test rows; keep g(H_k)."""
        sizes = self.dim, self.classes
        parts = [split_rows(row, self.samples[k], *sizes) for k, row in zip(up.clients, up.rows, strict=True)]
        h, z, y, h_test, y_test = (torch.cat(column) for column in zip(*parts, strict=True))
        metrics = self.train_server(round, h, z, y)
        if self.params.logit_memory == "last_round":
            self.logits.clear()
        with torch.no_grad():
            self.server.eval()
            metrics["server_acc"] = float((self.server(h).argmax(dim=1) == y).float().mean()) if y.numel() else 0.0
            if self.params.server_test and y_test.numel():  # pooled over the round's test samples, as test_acc
                out = self.server(h_test)
                metrics["server_test_loss"] = float(F.cross_entropy(out, y_test))
                metrics["server_test_acc"] = float((out.argmax(dim=1) == y_test).float().mean())
            if self.params.alpha > 0:
                for k, part in zip(up.clients, parts, strict=True):
                    self.logits[k] = self.server(part[0]).contiguous()
        return {**metrics, "uplink_samples": float(y.numel())}

    def train_server(self, round: int, h: Tensor, z: Tensor, y: Tensor) -> dict[str, float]:
        """``epochs_server`` epochs of the library loop on (h, z, y); the last epoch's mean CE and KD per batch."""
        p = self.params
        generator = torch.Generator().manual_seed(derive_seed(self.setup.seed, _SERVER_ORDER, round))
        loss = distillation(z, p.server_alpha, p.temperature, torch.float64)  # metrics summed in float64
        cfg = self.setup.train.model_copy(update={"local_epochs": 1, "batch_size": p.server_batch_size})
        for _ in range(p.epochs_server):  # one epoch per call: the metrics are the last epoch's
            means = local_training(self.server, h, y, cfg, generator, loss=loss, optimizer=self.server_step)
        return {"server_loss": means["train_loss"], "server_kd_loss": means["kd_loss"]}

    def server_state(self) -> dict[str, torch.Tensor | dict]:
        ids = sorted(self.logits)
        return {
            "server_model": self.server_layout.flatten(self.server),
            "optimizer": self.server_opt.state_dict()["state"],  # empty before the first step
            "logit_clients": torch.tensor(ids, dtype=torch.int64),
            "logits": torch.cat([self.logits[k].reshape(-1) for k in ids]) if ids else torch.zeros(0),
        }

    def load_server_state(self, state: dict[str, torch.Tensor | dict]) -> None:
        self.server_layout.load(self.server, torch.as_tensor(state["server_model"]))
        self.server_opt.load_state_dict({**self.server_opt.state_dict(), "state": state.get("optimizer", {})})
        ids = [int(k) for k in torch.as_tensor(state["logit_clients"]).reshape(-1)]
        chunks = torch.as_tensor(state["logits"]).reshape(-1).split([self.samples[k] * self.classes for k in ids])
        self.logits = {k: c.reshape(-1, self.classes).clone() for k, c in zip(ids, chunks, strict=True)}

    def global_state(self) -> dict[str, torch.Tensor]:
        return {"server_model": self.server_layout.flatten(self.server)}

    # -- client ---------------------------------------------------------------------------
    def client_update(self, client: Client, payload: torch.Tensor) -> Update:
        model = self.personal.load(client)
        has_logits = payload.numel() and float(payload[0])  # the server's logits on this client's samples follow
        teacher = payload[1:].reshape(-1, self.classes).to(client.train[0].device) if has_logits else None
        means = self.local_training(client, loss=distillation(teacher, self.params.alpha, self.params.temperature))
        self.personal.save(client, model)
        metrics = {name: means[name] for name in self.client_metrics}
        rows = [feature_rows(model, *client.train)]
        if self.params.server_test:  # the test samples' [H, y], for the server's score only
            rows.append(feature_rows(model, *client.test, logits=False))
        return Update(torch.cat(rows), float(client.num_train), metrics)

    def load_for_eval(self, client: Client, payload: None) -> None:
        self.personal.load(client)


def distillation(
    teacher: Tensor | None, alpha: float, temperature: float, dtype: torch.dtype = torch.float32
) -> LossFn:
    """CE + alpha * KD on a batch, KD = T^2 * mean over rows of KL(softmax(teacher / T) || softmax(logits / T)) with
    ``teacher`` indexed by the batch's sample positions (CE alone without a teacher or with alpha = 0). Reports
    ``train_loss`` (the CE) and, with a teacher, ``kd_loss``, as ``dtype`` (the dtype the loop sums them in)."""

    def loss(model: torch.nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        out = model(batch.x)
        ce = F.cross_entropy(out, batch.y)
        if teacher is None:
            return ce, {"train_loss": ce}
        log_p = F.log_softmax(teacher[batch.idx].detach() / temperature, dim=1)
        log_q = F.log_softmax(out / temperature, dim=1)
        kd = temperature**2 * (log_p.exp() * (log_p - log_q)).sum() / max(out.shape[0], 1)
        return ce + alpha * kd if alpha else ce, {"train_loss": ce.to(dtype), "kd_loss": kd.to(dtype)}

    return loss
