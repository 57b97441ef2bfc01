"""Byzantine clients, for testing robust aggregation: some clients send a corrupted update instead of theirs.

Which clients: the ids listed in ``clients``, plus a ``fraction`` of all N clients drawn once from
the run seed (a permutation of derive_seed(seed, "BYZA")): the same clients on every rank and in
every round. What they send, from the update u they would have sent (applied in ``client_update``,
to the vector that goes up, before any compression or sign):

- ``scale``:     scale * u (a huge update);
- ``sign_flip``: -scale * u (pushes the model the wrong way; under signSGD, the flipped vote);
- ``random``:    scale * z, z ~ N(0, I), drawn from derive_seed(seed, "BYZA", client, round).

Used by ``robust`` (mean, median, trimmed mean) and ``signsgd``; the same configuration with
``rule: mean`` shows what a non-robust aggregate does with the same attack.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..seeding import derive_seed
from .base import Client

_TAG = 0x4259_5A41  # "BYZA": stream tag of the Byzantine draws


class ByzantineConfig(BaseModel):
    """Which clients are Byzantine and what they send (config section ``algorithm.byzantine``)."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")
    fraction: float = Field(0.0, ge=0, le=1, description="fraction of all clients that are Byzantine (from the seed)")
    clients: list[int] = Field(default_factory=list, description="ids of clients that are Byzantine (added to those)")
    attack: Literal["scale", "sign_flip", "random"] = Field(
        "scale", description="scale: scale*u; sign_flip: -scale*u; random: scale*N(0, I)"
    )
    scale: float = Field(100.0, description="the attack's factor (scale, sign_flip) or standard deviation (random)")


class Byzantine:
    """The Byzantine clients of a run and their attack (a pure function of the seed, client and round)."""

    def __init__(self, cfg: ByzantineConfig, seed: int, num_clients: int):
        self.cfg, self.seed = cfg, seed
        chosen = set(cfg.clients)
        count = round(cfg.fraction * num_clients)
        if count:
            g = torch.Generator().manual_seed(derive_seed(seed, _TAG))
            chosen |= set(torch.randperm(num_clients, generator=g)[:count].tolist())
        self.ids = frozenset(chosen)

    def __contains__(self, client_id: int) -> bool:
        return client_id in self.ids

    def apply(self, update: torch.Tensor, client: Client) -> torch.Tensor:
        """What ``client`` sends instead of ``update`` (``update`` itself if the client is honest)."""
        if client.id not in self.ids:
            return update
        cfg = self.cfg
        if cfg.attack == "scale":
            return update * cfg.scale
        if cfg.attack == "sign_flip":
            return update * -cfg.scale
        g = torch.Generator().manual_seed(derive_seed(self.seed, _TAG, client.id, client.round))
        return cfg.scale * torch.randn(update.shape, generator=g, dtype=update.dtype).to(update.device)


_NOISE = 0x4E4F_4953  # "NOIS": stream tag of the clients' Gaussian perturbation


def gaussian_noise(like: torch.Tensor, sigma: float, seed: int, client: Client) -> torch.Tensor:
    """sigma * N(0, I) shaped like ``like``, from derive_seed(seed, "NOIS", client, round) (Chen et al., 2020)."""
    g = torch.Generator().manual_seed(derive_seed(seed, _NOISE, client.id, client.round))
    return sigma * torch.randn(like.shape, generator=g, dtype=like.dtype).to(like.device)
