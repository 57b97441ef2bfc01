"""FetchSGD (Rothchild et al., ICML 2020, "FetchSGD: Communication-Efficient Federated Learning with Sketching").

Clients keep no state. Each sampled client runs FedAvg's local training from w and sends a Count
Sketch S(u_k) (r rows x c columns, sketch.py) of its update u_k = w_k - w; the hash tables come from
the run seed, so every rank has them. Sketches are linear: one Reduce (WeightedSum, float32) gives
the server S(u) of the weighted mean update u. The server keeps momentum and error accumulation in
sketch space (the paper's Algorithm 1, with the update u = -g written as a step direction):

    S_u <- rho S_u + S(u)           (momentum)
    S_e <- S_e + lr S_u             (error accumulation)
    Delta = TopK(unsketch(S_e), k)  (the k heavy coordinates)
    zero S_u and S_e in the buckets of Delta's coordinates
    w <- w + Delta

Choice: Delta takes the sketch's estimates of the k heavy coordinates; the paper's optional second
round trip, fetching their exact values from the clients, is not made.

Moves, per round: w down by Broadcast (4 d bytes per worker); up, one Reduce of r c + 1 float32 per
worker (the sketch and the summed weight): 4 (r c + 1) bytes, independent of d and of the clients.
Defaults: rows 5 and rho 0.9 as in the authors' code (CommEfficient); columns and k depend on d.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from ..seeding import derive_seed
from ..training.loop import Means
from .base import Client, Setup, Update, WeightedMean, WeightedSum
from .registry import register
from .shared_model import TrainsFromW
from .sketch import CountSketch, top_k
from .weighting import Weighting

_SKETCH = 0x534B_4554  # "SKET": stream tag of the sketch's hash tables


class FetchSGDParams(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")
    rows: int = Field(5, ge=1, description="r: rows of the Count Sketch (independent hash functions)")
    columns: int = Field(1000, ge=1, description="c: columns (buckets) of each row")
    k: int = Field(100, ge=1, description="k: coordinates recovered from the error sketch and applied per round")
    rho: float = Field(0.9, ge=0, lt=1, description="rho: server momentum, kept in sketch space")
    lr: float = Field(1.0, gt=0, description="eta: server learning rate applied to the momentum sketch")
    weighting: Weighting = Field("samples", description="client weights of the summed sketch (see weighting.py)")


@register
class FetchSGD(TrainsFromW):
    name = "fetchsgd"
    Params = FetchSGDParams
    up = WeightedSum()  # a Count Sketch of w_k - w

    def __init__(self, params: FetchSGDParams, setup: Setup):
        super().__init__(params, setup)
        d = self.shared.numel
        if params.k > d:
            raise ConfigError("algorithm.k", f"{params.k} exceeds the model's {d} shared parameters")
        self.sketcher = CountSketch(d, params.rows, params.columns, derive_seed(setup.seed, _SKETCH))

    def up_numel(self) -> int:
        return self.sketcher.numel

    # -- server ---------------------------------------------------------------------------
    def init_server(self) -> None:
        self.shared.init_server()  # w; its step is the sketch's, not a FedOpt optimiser
        shape = (self.params.rows, self.params.columns)
        self.s_u, self.s_e = torch.zeros(shape), torch.zeros(shape)

    def aggregate(self, round: int, up: WeightedMean) -> dict[str, float]:
        p = self.params
        if up.total_weight == 0:
            return {"update_norm": 0.0}
        self.s_u.mul_(p.rho).add_(up.mean.view(p.rows, p.columns))
        self.s_e.add_(self.s_u, alpha=p.lr)
        index, values = top_k(self.sketcher.unsketch(self.s_e), p.k)
        self.sketcher.zero(self.s_u, index)
        self.sketcher.zero(self.s_e, index)
        self.shared.w[index] += values
        return {"update_norm": float(values.norm()), "error_sketch_norm": float(self.s_e.norm())}

    def server_state(self) -> dict[str, torch.Tensor]:
        return {**self.shared.server_state(), "s_u": self.s_u, "s_e": self.s_e}

    def load_server_state(self, state: dict[str, torch.Tensor]) -> None:
        self.shared.load_server_state(state)
        self.s_u.copy_(state["s_u"])
        self.s_e.copy_(state["s_e"])

    # -- client ---------------------------------------------------------------------------
    # the client step is FedAvg's, split for batched clients (training/batched.py)
    def finish_training(self, client: Client, payload: torch.Tensor, means: Means) -> Update:
        u, weight = self.trained(client, payload)
        return Update(self.sketcher.sketch(u).reshape(-1), weight, {"train_loss": means["train_loss"]})
