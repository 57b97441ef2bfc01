"""A plugin for the dtype tests: an algorithm whose messages have any wire dtype and known contents.

Nothing is trained. Every payload is a pure function of (round, client, position), so both ends can
check it: the client asserts that what it received is what the server meant to send, bit for bit;
the server keeps what came up (``received``) for the test to compare with ``expected_*``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from pfl_mpi.algorithms import Algorithm, Broadcast, Client, Gathered, PerClient, Phase, Update, WeightedSum, register

DTYPES = {name: getattr(torch, name) for name in ("float32", "float64", "float16", "int8", "int16", "int32", "uint8")}


class ProbeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    down: Literal["broadcast", "per_client"] = "broadcast"
    down_dtype: str = "int8"
    up: Literal["sum", "gathered"] = "sum"
    up_dtype: str = "int8"
    numel: int = 37


def values(dtype: torch.dtype, n: int, *keys: int) -> torch.Tensor:
    """A deterministic payload of ``n`` elements of ``dtype`` (small integers, exact in every dtype)."""
    base = sum((i + 3) * k for i, k in enumerate(keys))
    v = (torch.arange(n) * 7 + base) % 5 - 2  # in -2..2
    return (v + 2 if dtype == torch.uint8 else v).to(dtype)


def expected_down(algo: DtypeProbe, round: int, clients: list[int]) -> torch.Tensor:
    if isinstance(algo.down, Broadcast):
        return values(algo.down.dtype, algo.params.numel, round)
    return torch.stack([values(algo.down.dtype, algo.params.numel, round, k) for k in clients])


def client_payload(algo: DtypeProbe, round: int, client: int) -> torch.Tensor:
    return values(algo.up.dtype, algo.params.numel, round, client, 1)


def client_weight(client: int) -> float:
    return float(client % 3 + 1)  # integers: int sums need them


@register
class DtypeProbe(Algorithm):
    name = "dtype_probe"
    Params = ProbeParams
    client_metrics = ("train_loss",)

    def __init__(self, params: ProbeParams, setup):
        super().__init__(params, setup)
        down = DTYPES[params.down_dtype]
        self.down = self.eval_down = Broadcast(down) if params.down == "broadcast" else PerClient(down)
        up = DTYPES[params.up_dtype]
        self.up = WeightedSum(up) if params.up == "sum" else Gathered(up)
        self.received: list = []

    def down_numel(self) -> int:
        return self.params.numel

    def up_numel(self) -> int:
        return self.params.numel

    def downlink(self, round: int, clients: list[int], phase: Phase) -> torch.Tensor:
        return expected_down(self, round, clients)

    def aggregate(self, round: int, up) -> dict[str, float]:
        self.received.append(up)
        return {}

    def _check(self, client: Client, payload: torch.Tensor) -> None:
        expected = expected_down(self, client.round, [client.id])
        expected = expected if isinstance(self.down, Broadcast) else expected[0]
        assert payload.dtype == self.down.dtype, payload.dtype
        assert torch.equal(payload, expected), (payload, expected)

    def client_update(self, client: Client, payload: torch.Tensor) -> Update:
        self._check(client, payload)
        return Update(client_payload(self, client.round, client.id), client_weight(client.id), {"train_loss": 0.0})

    def load_for_eval(self, client: Client, payload: torch.Tensor) -> None:
        self._check(client, payload)
