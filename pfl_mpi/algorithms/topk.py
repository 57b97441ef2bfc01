"""Top-k sparsification with client-side error feedback (Stich et al., NeurIPS 2018; Karimireddy et al.,
ICML 2019), on FedAvg's updates.

Each client keeps a residual e_k (its state, d float32, zero at first). In a round it trains from w,
forms a = e_k + (w_k - w), sends the k entries of a largest in magnitude as (indices, float32
values), and keeps the rest: e_k <- a with those k entries zeroed. What a client leaves out is not
lost: it is added to its next update, so over rounds every coordinate's mass is sent
(sum of what was sent + e_k = sum of its updates, exactly, at every round).

Moves: w down by Broadcast (4 d bytes per worker); up, one packed uint8 payload per sampled client:
the k indices in ceil(log2 d) bits each (bitpack.py), then k float32 values, ceil(k ceil(log2 d) / 8)
+ 4 k bytes per client (Gatherv), instead of 4 d (with d = 4,810, 13 bits instead of an int32). The server
scatters each client's values into a dense vector and forms the weighted mean of the sparse updates
(the decoding is part of ``aggregate``, so its time is the server's aggregation time), then applies
FedAvg's server optimiser.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..errors import ConfigError
from ..training.loop import Means
from .base import Client, Collected, Gathered, Setup, Update, pack, unpack
from .bitpack import bits_for, pack_codes, packed_bytes, unpack_codes
from .fedavg import FedAvgParams
from .registry import register
from .shared_model import TrainsFromW
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


def encode(index: torch.Tensor, values: torch.Tensor, d: int) -> torch.Tensor:
    """The uint8 payload of a sparse vector of size ``d``: indices in ``bits_for(d)`` bits, then float32 values."""
    return pack(pack_codes(index, bits_for(d)), values.float())


def payload_size(k: int, d: int) -> int:
    """Bytes of ``encode``'s payload for k entries of a d-vector."""
    return packed_bytes(k, bits_for(d)) + 4 * k


def unpack_sparse(row: torch.Tensor, k: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 indices, float32 values) of a payload made by ``encode``."""
    codes, values = unpack(row, (torch.uint8, packed_bytes(k, bits_for(d))), (torch.float32, k))
    return unpack_codes(codes, bits_for(d), k), values


def decode(row: torch.Tensor, k: int, d: int) -> torch.Tensor:
    """The dense vector [d] of a sparse update packed by ``encode`` (zeros but at its k indices)."""
    index, values = unpack_sparse(row, k, d)
    return torch.zeros(d).index_put_((index,), values)


@register
class TopK(TrainsFromW):
    name = "topk"
    Params = TopKParams
    up = Gathered(torch.uint8)
    client_metrics = ("train_loss", "residual_norm")

    def __init__(self, params: TopKParams, setup: Setup):
        super().__init__(params, setup)
        if params.k > self.shared.numel:
            raise ConfigError("algorithm.k", f"{params.k} exceeds the model's {self.shared.numel} shared parameters")

    def up_numel(self) -> int:
        return payload_size(self.params.k, self.shared.numel)

    def client_state_spec(self, group: int) -> dict[str, int]:
        return {"residual": self.shared.numel}

    def init_client_state(self, client_id: int) -> dict[str, torch.Tensor]:
        return {"residual": torch.zeros(self.shared.numel)}

    # -- server ---------------------------------------------------------------------------

    def aggregate(self, round: int, up: Collected) -> dict[str, float]:
        d = self.shared.numel
        return self.shared.step(up.weighted_mean(lambda row: decode(row, self.params.k, d), d))

    # -- client ---------------------------------------------------------------------------
    # the client step is FedAvg's, split for batched clients (training/batched.py)
    def finish_training(self, client: Client, payload: torch.Tensor, means: Means) -> Update:
        delta, weight = self.trained(client, payload)
        residual = client.state["residual"]
        accumulated = residual + delta if self.params.error_feedback else delta
        index, values, rest = compress(accumulated, self.params.k)
        if self.params.error_feedback:
            residual.copy_(rest)
        metrics = {"train_loss": means["train_loss"], "residual_norm": float(residual.norm())}
        return Update(encode(index, values, self.shared.numel), weight, metrics)
