"""QSGD stochastic quantisation (Alistarh et al., NeurIPS 2017, "QSGD: Communication-Efficient SGD via
Gradient Quantization and Encoding"), on FedAvg's updates.

A client's update v is cut into buckets of ``bucket_size`` consecutive entries (the paper's bucketing,
d' in its experiments); each bucket b is sent as its norm ||v_b||_2 (float32) and, per entry, the
signed level sign(v_i) l_i with l_i in {0..s}: l_i = floor(s |v_i| / ||v_b||) plus 1 with probability
s |v_i| / ||v_b|| - floor(s |v_i| / ||v_b||) (the random rounding of Q_s, from the client's generator).
The server decodes Q_s(v_i) = ||v_b|| sign(v_i) l_i / s, which is unbiased: E[Q_s(v)] = v.

Packing: each signed level shifted to l + s in 0..2s and packed in ceil(log2(2 s + 1)) bits
(bitpack.py; 6 bits for the default s = 16, 2 bits for s = 1), instead of the paper's Elias coding.
Moves: w down by Broadcast (4 d bytes per worker); up, one uint8 payload per sampled client,
4 ceil(d / bucket_size) + ceil(d b / 8) bytes with b those bits (Gatherv): 3/16 of float32's 4 d
at s = 16. The server decodes each
client's payload in ``aggregate`` (counted as aggregation time), takes the weighted mean and applies
FedAvg's server optimiser.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from ..training.loop import Means
from .base import Client, Collected, Gathered, Setup, Update, pack, packed_size, unpack
from .bitpack import bits_for, pack_codes, packed_bytes, unpack_codes
from .fedavg import FedAvgParams
from .registry import register
from .shared_model import TrainsFromW


class QSGDParams(FedAvgParams):
    s: int = Field(
        16, ge=1, le=127, description="s: quantisation levels per sign (at most 127: a level is an int8 before packing)"
    )
    bucket_size: int = Field(512, ge=1, description="d': entries per bucket, each with its own norm (paper: 512)")


def quantize(
    v: torch.Tensor, s: int, bucket_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(bucket norms float32 [ceil(d / bucket_size)], signed levels int8 [d]) of Q_s(v)."""
    v = v.detach().float().cpu().reshape(-1)
    d = v.numel()
    buckets = math.ceil(d / bucket_size)
    padded = torch.zeros(buckets * bucket_size)
    padded[:d] = v
    padded = padded.view(buckets, bucket_size)
    norms = padded.norm(dim=1)
    scaled = padded.abs() * (s / norms.clamp_min(torch.finfo(torch.float32).tiny))[:, None]
    floor = scaled.floor()
    up = torch.rand(scaled.shape, generator=generator) < (scaled - floor)
    levels = (floor + up).clamp_max(s) * padded.sign()
    return norms, levels.reshape(-1)[:d].to(torch.int8)


def dequantize(norms: torch.Tensor, levels: torch.Tensor, s: int, bucket_size: int) -> torch.Tensor:
    """Q_s(v) [d] from bucket norms and signed levels."""
    scale = norms.repeat_interleave(bucket_size)[: levels.numel()]
    return scale * levels.float() / s


@register
class QSGD(TrainsFromW):
    name = "qsgd"
    Params = QSGDParams
    up = Gathered(torch.uint8)

    def __init__(self, params: QSGDParams, setup: Setup):
        super().__init__(params, setup)
        self.buckets = math.ceil(self.shared.numel / params.bucket_size)
        self.bits = bits_for(2 * params.s + 1)  # per level: l + s in 0..2s

    def parts(self) -> tuple[tuple[torch.dtype, int], ...]:
        return (torch.float32, self.buckets), (torch.uint8, packed_bytes(self.shared.numel, self.bits))

    def up_numel(self) -> int:
        return packed_size(*self.parts())

    # -- server ---------------------------------------------------------------------------

    def aggregate(self, round: int, up: Collected) -> dict[str, float]:
        return self.shared.step(up.weighted_mean(self.decode, self.shared.numel))

    def decode(self, row: torch.Tensor) -> torch.Tensor:
        norms, codes = unpack(row, *self.parts())
        levels = unpack_codes(codes, self.bits, self.shared.numel) - self.params.s
        return dequantize(norms, levels, self.params.s, self.params.bucket_size)

    # -- client ---------------------------------------------------------------------------
    # the client step is FedAvg's, split for batched clients (training/batched.py; the quantiser then draws
    # from the client's generator where the sequential loop leaves it)
    def finish_training(self, client: Client, payload: torch.Tensor, means: Means) -> Update:
        delta, weight = self.trained(client, payload)
        norms, levels = quantize(delta, self.params.s, self.params.bucket_size, client.generator)
        packed = pack(norms, pack_codes(levels.long() + self.params.s, self.bits))
        return Update(packed, weight, {"train_loss": means["train_loss"]})
