"""Server optimisers of FedOpt (Reddi et al., ICLR 2021, "Adaptive Federated Optimization", Algorithm 2).

The server treats the weighted mean client update ``Delta_t = sum_k p_k (w_k - w)`` as a step direction
(a negative pseudo-gradient) and applies one of:

- sgd:     buf = mu buf + Delta;  x += eta buf  (mu = 0 and eta = 1 is plain FedAvg: x + Delta, exactly)
- adagrad: v = v + Delta^2
- adam:    v = beta2 v + (1 - beta2) Delta^2
- yogi:    v = v - (1 - beta2) Delta^2 sign(v - Delta^2)

and, for the adaptive three, m = beta1 m + (1 - beta1) Delta; x += eta m / (sqrt(v) + tau), starting from
m = 0 and v = tau^2 as in the paper (no bias correction, as in the paper).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..training.loop import ScheduleConfig, lr_factor


class ServerOptConfig(BaseModel):
    """The server's optimiser and its hyper-parameters, named as in Reddi et al."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    name: Literal["sgd", "adam", "yogi", "adagrad"] = Field(
        "sgd", description="Server optimiser: sgd (FedAvg / FedAvgM), adam, yogi or adagrad (FedOpt)."
    )
    lr: float = Field(1.0, gt=0, allow_inf_nan=False, description="Server learning rate eta.")
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd only: heavy-ball momentum mu.")
    beta1: float = Field(0.9, ge=0, lt=1, description="adam/yogi/adagrad: decay of the first moment m.")
    beta2: float = Field(0.99, ge=0, lt=1, description="adam/yogi: decay of the second moment v.")
    tau: float = Field(1e-3, gt=0, allow_inf_nan=False, description="adam/yogi/adagrad: adaptivity; v starts at tau^2.")
    schedule: ScheduleConfig = Field(
        default_factory=ScheduleConfig, description="eta over rounds: eta_t = lr * factor(t) (as train.schedule)"
    )

    @model_validator(mode="after")
    def _momentum_is_sgd_only(self) -> ServerOptConfig:
        if self.momentum != 0 and self.name != "sgd":
            raise ValueError(f"momentum applies to sgd only; {self.name} uses beta1")
        return self


class ServerOptimizer:
    """Applies the server step to a flat float32 parameter vector of ``numel`` entries, in place."""

    def __init__(self, cfg: ServerOptConfig, numel: int, rounds: int = 1):
        self.cfg = cfg
        self.numel = int(numel)
        self.rounds = rounds  # the run's rounds, for a cosine schedule without a period
        self.steps = 0
        self._state: dict[str, torch.Tensor] = {}
        if cfg.name == "sgd":
            if cfg.momentum > 0:
                self._state["buf"] = torch.zeros(self.numel, dtype=torch.float32)
        else:
            self._state["m"] = torch.zeros(self.numel, dtype=torch.float32)
            self._state["v"] = torch.full((self.numel,), cfg.tau**2, dtype=torch.float32)

    @torch.no_grad()
    def step(self, params: torch.Tensor, update: torch.Tensor) -> None:
        """params (1-D float32) += the optimiser's step computed from ``update``, the weighted mean client
        update Delta_t = sum p_k (w_k - w)."""
        if params.shape != (self.numel,) or update.shape != (self.numel,):
            raise ValueError(
                f"expected 1-D tensors of {self.numel} values, got {tuple(params.shape)} and {tuple(update.shape)}"
            )
        self._move_to(params.device)
        update = update.to(device=params.device, dtype=torch.float32)
        cfg = self.cfg
        lr = cfg.lr * lr_factor(cfg.schedule, self.steps, self.rounds)
        if cfg.name == "sgd":
            if cfg.momentum > 0:
                buf = self._state["buf"]
                buf.mul_(cfg.momentum).add_(update)
                update = buf
            params.add_(update, alpha=lr)
        else:
            m, v = self._state["m"], self._state["v"]
            m.mul_(cfg.beta1).add_(update, alpha=1 - cfg.beta1)
            sq = update * update
            if cfg.name == "adagrad":
                v.add_(sq)
            elif cfg.name == "adam":
                v.mul_(cfg.beta2).add_(sq, alpha=1 - cfg.beta2)
            else:  # yogi
                v.addcmul_(torch.sign(v - sq), sq, value=-(1 - cfg.beta2))
            params.addcdiv_(m, v.sqrt().add_(cfg.tau), value=lr)
        self.steps += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies (on the CPU) of everything needed to resume exactly, including the step count ``step``."""
        state = {k: t.detach().to("cpu", copy=True) for k, t in self._state.items()}
        state["step"] = torch.tensor(self.steps, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a state written by ``state_dict`` of an optimiser with the same configuration and size."""
        expected = set(self._state) | {"step"}
        if set(state) != expected:
            raise ValueError(f"server optimiser state has keys {sorted(state)}, expected {sorted(expected)}")
        for k, t in self._state.items():
            src = torch.as_tensor(state[k])
            if src.shape != t.shape:
                raise ValueError(f"server optimiser state {k} has shape {tuple(src.shape)}, expected {tuple(t.shape)}")
            t.copy_(src)
        self.steps = int(torch.as_tensor(state["step"]).item())

    def _move_to(self, device: torch.device) -> None:
        for k, t in self._state.items():
            if t.device != device:
                self._state[k] = t.to(device)
