"""The ``novel`` section (how much a novel client may adapt) and the checks of ``data.novel_clients``.

Novel clients (``data.novel_clients``) never train; after the last round each is served by its algorithm's
rule (docs/novel_clients.md). Checked before MPI starts, with one line naming the key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import RunConfig


class NovelConfig(BaseModel):
    """The budget of serving a novel client, the same for every algorithm that trains to serve one."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    epochs: int | None = Field(
        None,
        ge=0,
        description="local epochs a novel client trains on its training split to adapt what it is served (fine-tune "
        "the global model, fit the personal part on the frozen shared one, Local: train from scratch); None: "
        "train.local_epochs; 0: served as it is",
    )
    steps: int = Field(
        20,
        ge=0,
        description="pfedhn, pfedhn-pc: steps fitting the novel client's embedding with phi frozen (each: theta "
        "down, algorithm.inner_steps local steps, delta up: steps x inner_steps local steps in all)",
    )
    lr: float | None = Field(
        None, gt=0, description="learning rate of the adaptation; None: train.lr (pfedhn: algorithm.lr)"
    )


def check_novel(cfg: RunConfig, cls) -> None:
    """``data.novel_clients``: a count below the clients, or a fraction in (0, 1), leaving room for
    ``clients_per_round``; an algorithm (``cls``; None: not checked) that serves novel clients."""
    value, n = cfg.data.novel_clients, cfg.data.num_clients
    if isinstance(value, float) and not 0 < value < 1:
        raise ConfigError("data.novel_clients", f"{value} is neither a count (an integer) nor a fraction in (0, 1)")
    held = cfg.data.novel_count(n)
    if not held:
        if value:
            raise ConfigError("data.novel_clients", f"the fraction {value} of {n} clients rounds to 0 clients")
        return
    if held >= n:
        raise ConfigError("data.novel_clients", f"holds out {held} of the {n} clients (data.num_clients): none trains")
    if cfg.clients_per_round is not None and cfg.clients_per_round > n - held:
        raise ConfigError(
            "clients_per_round",
            f"{cfg.clients_per_round} exceeds the {n - held} clients that train "
            f"(data.num_clients {n} minus data.novel_clients {held})",
        )
    if cls is not None and not cls.serves_novel:
        raise ConfigError(
            "data.novel_clients",
            f"{cls.name} does not serve novel clients (docs/novel_clients.md says which algorithms do); set it to 0",
        )
