"""signSGD with majority vote (Bernstein et al., ICLR 2019, "signSGD with Majority Vote is Communication
Efficient and Fault Tolerant"), and its noisy variant (Chen et al., NeurIPS 2020).

Each sampled client runs FedAvg's local training from w and sends the sign of its update
u_k = w_k - w (plus Gaussian noise N(0, sigma^2 I) first when ``sigma`` > 0: Chen et al.'s
perturbed signSGD, which reduces the vote's bias under non-IID data). The server takes the
majority vote sign(sum_k sign(u_k)) and steps w <- w + lr * vote. Every client counts once.

Moves: w down by Broadcast (float32, 4 d bytes per worker). The vote is linear in the signs, so it
is a WeightedSum in a small integer dtype: each rank sums its clients' int8 signs, one Reduce
adds the ranks' sums. The dtype is the narrowest signed integer that holds N (the number of
clients, which bounds any round's vote): int8 for N <= 127, int16 up to 32767, then int32. Bytes up
per worker: itemsize * d + 16 (the float64 summed weight and overflow bound), i.e. d + 16 for
int8, against 4 d + 4 for FedAvg. Byzantine clients (byzantine.py) corrupt u_k before its sign
(``sign_flip`` sends the opposite vote).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..training.loop import Means
from .base import Client, Setup, Update, WeightedMean, WeightedSum
from .byzantine import Byzantine, ByzantineConfig, gaussian_noise
from .registry import register
from .server_opt import ServerOptConfig
from .shared_model import SharedModelAlgorithm


class SignSGDParams(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")
    lr: float = Field(0.001, gt=0, description="server step size eta: w <- w + eta * sign(sum_k sign(u_k))")
    sigma: float = Field(0.0, ge=0, description="std of the noise added to u_k before its sign (Chen et al.); 0: none")
    byzantine: ByzantineConfig = Field(default_factory=ByzantineConfig, description="Byzantine clients (testing)")


def vote_dtype(num_clients: int) -> torch.dtype:
    """The narrowest signed integer dtype that holds a sum of ``num_clients`` signs."""
    for dtype in (torch.int8, torch.int16, torch.int32):
        if num_clients <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


@register
class SignSGD(SharedModelAlgorithm):
    name = "signsgd"
    Params = SignSGDParams

    def __init__(self, params: SignSGDParams, setup: Setup):
        super().__init__(params, setup)
        self.up = WeightedSum(vote_dtype(setup.num_clients))
        self.byzantine = Byzantine(params.byzantine, setup.seed, setup.num_clients)

    def up_numel(self) -> int:
        return self.shared.numel

    # -- server ---------------------------------------------------------------------------
    def init_server(self) -> None:
        self.shared.init_server(ServerOptConfig(lr=self.params.lr))  # w <- w + lr * vote

    def aggregate(self, round: int, up: WeightedMean) -> dict[str, float]:
        vote = torch.sign(up.sum.to(torch.float32))
        self.shared.step(vote)
        return {"update_norm": float(vote.norm()) * self.params.lr, "vote_agreement": float(up.mean.abs().mean())}

    # -- client ---------------------------------------------------------------------------
    # the client step is FedAvg's, split for batched clients (training/batched.py)
    def begin_training(self, client: Client, payload: torch.Tensor) -> dict:
        self.shared.load(client, payload)
        return {}

    def finish_training(self, client: Client, payload: torch.Tensor, means: Means) -> Update:
        u = self.shared.collect(client, payload)
        if self.params.sigma > 0:
            u = u + gaussian_noise(u, self.params.sigma, self.setup.seed, client)
        u = self.byzantine.apply(u, client)
        return Update(torch.sign(u).to(torch.int8).to(self.up.dtype), 1.0, {"train_loss": means["train_loss"]})
