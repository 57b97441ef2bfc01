"""The ``train`` section of the configuration (client-side local training) and learning-rate schedules.

Schemas and arithmetic only, without torch: the configuration is read (``pfl-mpi slurm``, ``config``)
without importing it. The optimisers these build are in optimizers.py, the loop in loop.py.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ScheduleConfig(BaseModel):
    """A learning rate over rounds: lr_t = lr * factor(t) (config ``train.schedule``, ``server_opt.schedule``)."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    name: Literal["constant", "step", "exponential", "cosine"] = Field(
        "constant",
        description="constant; step: x gamma every step_size rounds; exponential: x gamma^t; cosine: "
        "from 1 down to min_factor over period rounds",
    )
    step_size: int = Field(10, ge=1, description="step: rounds between two decays")
    gamma: float = Field(0.1, gt=0, le=1, description="step, exponential: the decay factor")
    min_factor: float = Field(0.0, ge=0, le=1, description="cosine: the factor at the end of the period")
    period: int | None = Field(None, ge=1, description="cosine: rounds of the period; null = the run's rounds")


def lr_factor(schedule: ScheduleConfig, t: int, rounds: int) -> float:
    """factor(t) of the schedule at round ``t`` (0-based) of a run of ``rounds`` rounds."""
    if schedule.name == "step":
        return schedule.gamma ** (t // schedule.step_size)
    if schedule.name == "exponential":
        return schedule.gamma**t
    if schedule.name == "cosine":
        period = schedule.period or rounds
        progress = min(t, period) / max(period, 1)
        return schedule.min_factor + (1 - schedule.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


class AutoClientBatch(BaseModel):
    """``train.client_batch: {memory_mb: M}``: as ``auto``, within a memory budget of M MB per rank."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    memory_mb: float = Field(gt=0, description="memory budget of one block of clients, in MB")


class TrainConfig(BaseModel):
    """Client-side local training (config section ``train``)."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    local_epochs: int = Field(1, ge=1, description="epochs over the client's training split per round (E)")
    batch_size: int = Field(32, ge=1, description="minibatch size (B)")
    lr: float = Field(0.05, gt=0, description="client learning rate (eta)")
    optimizer: Literal["sgd", "adam", "adamw"] = Field(
        "sgd", description="client optimiser (torch's rules); its state as optimizer_state says"
    )
    optimizer_state: Literal["reset", "keep"] = Field(
        "reset",
        description="reset: fresh optimiser state every round; keep: each client's moments (momentum buffer, "
        "Adam's moments and step) persist in its client state between rounds (checkpointed, resumed)",
    )
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd: momentum (dampening 0)")
    nesterov: bool = Field(False, description="sgd: Nesterov momentum (needs momentum > 0)")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay (adamw: decoupled)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam, adamw: the moment decay rates")
    eps: float = Field(1e-8, gt=0, description="adam, adamw: the denominator's epsilon")
    clip_norm: float | None = Field(None, gt=0, description="scale each step's gradient to at most this L2 norm")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="the learning rate over rounds")
    loss: str | None = Field(
        None,
        description="your training loss, package.module:function, called as function(outputs, targets) -> the "
        "batch's mean (imported on every rank; a plugin file's module is its file name); null = the task's loss",
    )
    client_batch: int | Literal["auto"] | AutoClientBatch = Field(
        1,
        description="clients trained together per kernel (training/batched.py): 1 = one after another; K; "
        "auto = K from the device's memory budget and the model's size; {memory_mb: M} = auto within M MB",
    )

    @field_validator("loss")
    @classmethod
    def _loss_spec(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", value):
            raise ValueError(f"{value!r} must be written package.module:function")
        return value

    @field_validator("client_batch", mode="before")
    @classmethod
    def _client_batch(cls, value: object) -> object:
        """One message for every wrong form (pydantic would name the first member of the union it tried)."""
        wrong = f"must be auto, {{memory_mb: M}} with M > 0, or an integer >= 1; got {value!r}"
        if isinstance(value, dict):
            try:
                return AutoClientBatch.model_validate(value)
            except ValidationError:
                raise ValueError(wrong) from None
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(wrong)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer sgd with momentum > 0")
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(f"momentum applies to sgd; {self.optimizer} uses betas")
        defaults = type(self).model_fields
        for key in ("betas", "eps"):
            if self.optimizer == "sgd" and getattr(self, key) != defaults[key].default:
                raise ValueError(f"train.{key} applies to adam and adamw; sgd would ignore it")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError("betas must lie in [0, 1)")
        return self
