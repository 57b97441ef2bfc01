"""Top-k sparsification with client-side error feedback (Stich et al., NeurIPS 2018; Karimireddy et al.,
ICML 2019), on FedAvg's updates.

Each client keeps a residual e_k (its state, d float32, zero at first). In a round it trains from w,
forms a = e_k + (w_k - w), sends the k entries of a largest in magnitude as (int32 indices, float32
values), and keeps the rest: e_k <- a with those k entries zeroed. What a client leaves out is not
lost: it is added to its next update, so over rounds every coordinate's mass is sent
(sum of what was sent + e_k = sum of its updates, exactly, at every round).

Moves: w down by Broadcast (4 d bytes per worker); up, one packed uint8 payload per sampled client,
k int32 indices then k float32 values: 8 k bytes per client (Gatherv), instead of 4 d. The server
scatters each client's values into a dense vector and forms the weighted mean of the sparse updates
(the decoding is part of ``aggregate``, so its time is the server's aggregation time), then applies
FedAvg's server optimiser.
"""

from __future__ import annotations

import torch
from pydantic import Field

from .base import Client, Collected, Gathered, Setup, Update, pack, packed_size, unpack
from .fedavg import FedAvg, FedAvgParams
from .registry import register
from .sketch import top_k


class TopKParams(FedAvgParams):
    k: int = Field(100, ge=1, description="k: entries of the error-corrected update each client sends per round")
    error_feedback: bool = Field(True, description="keep what was not sent as the client's residual (EF)")


def compress(accumulated: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices int32, values float32, residual) of top-k sparsification of ``accumulated``."""
    index, values = top_k(accumulated, k)
    residual = accumulated.clone()
    residual[index] = 0
    return index.to(torch.int32), values.float(), residual


def decode(payloads: torch.Tensor, weights: torch.Tensor, k: int, d: int) -> torch.Tensor:
    """The weighted mean [d] of the sparse updates packed in ``payloads`` [K, 8 k] (uint8)."""
    dense = torch.zeros(d, dtype=torch.float64)
    total = float(weights.sum())
    if total == 0:
        return dense.float()
    for row, weight in zip(payloads, weights.tolist(), strict=True):
        index, values = unpack(row, (torch.int32, k), (torch.float32, k))
        dense.index_add_(0, index.long(), values.double() * (weight / total))
    return dense.float()


@register
class TopK(FedAvg):
    name = "topk"
    Params = TopKParams
    up = Gathered(torch.uint8)
    client_metrics = ("train_loss", "residual_norm")

    def __init__(self, params: TopKParams, setup: Setup):
        super().__init__(params, setup)
        if params.k > self.shared.numel:
            raise ValueError(f"topk: k = {params.k} exceeds the {self.shared.numel} shared parameters")

    def up_numel(self) -> int:
        return packed_size((torch.int32, self.params.k), (torch.float32, self.params.k))

    def client_state_spec(self) -> dict[str, int]:
        return {**super().client_state_spec(), "residual": self.shared.numel}

    def init_client_state(self, client_id: int) -> dict[str, torch.Tensor]:
        return {**super().init_client_state(client_id), "residual": torch.zeros(self.shared.numel)}

    def aggregate(self, round: int, up: Collected) -> dict[str, float]:
        mean = decode(up.payloads, up.weights, self.params.k, self.shared.numel)
        self.optimizer.step(self.w, mean)
        return {"update_norm": float(mean.norm())}

    def client_update(self, client: Client, payload: torch.Tensor) -> Update:
        update = super().client_update(client, payload)  # FedAvg: trains, keeps personal layers
        residual = client.state["residual"]
        accumulated = residual + update.payload if self.params.error_feedback else update.payload
        index, values, rest = compress(accumulated, self.params.k)
        if self.params.error_feedback:
            residual.copy_(rest)
        update.metrics["residual_norm"] = float(residual.norm())
        update.payload = pack(index, values)
        return update
