"""Validation of the task against the config and the algorithm: what an algorithm cannot honour (a regression
task, a user loss, kept optimiser state) and real-valued targets, each refused with one line naming the key."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from .tasks import import_loss, task_name

if TYPE_CHECKING:
    from ..algorithms.base import Algorithm
    from ..config import RunConfig


def check_task(cfg: RunConfig, cls: type[Algorithm]) -> None:
    """Refuse, with one line naming the key, what the algorithm ``cls`` cannot honour: a regression task or a
    ``train.loss`` when it trains with a cross-entropy of its own (``own_loss``), ``train.optimizer_state: keep``
    when it runs its own optimiser (``replaces_train`` names ``optimizer``). Imports ``train.loss``."""
    task = task_name(cfg.task, cfg.data.name)
    check_targets(cfg, task)
    if cls.own_loss and task == "regression":
        raise ConfigError("task", f"{cls.name} trains with a cross-entropy of its own: classification tasks only")
    if cfg.train.loss is not None:
        if cls.own_loss:
            raise ConfigError("train.loss", f"{cls.name} trains with a loss of its own; remove train.loss")
        import_loss(cfg.train.loss)
    if cfg.train.client_batch != 1 and task == "regression":  # (batched.py trains keep/loss alone)
        raise ConfigError("train.client_batch", "batched clients train a cross-entropy; set 1 for task regression")
    if cfg.train.optimizer_state == "keep" and "optimizer" in cls.replaces_train:
        instead = cls.replaces_train["optimizer"]
        raise ConfigError("train.optimizer_state", f"{cls.name} does not use the train optimiser; set {instead}")


def check_targets(cfg: RunConfig, task: str) -> None:
    """Real-valued targets (``data.targets: values``) need ``task: regression`` and a client weighting that does
    not read class labels; ``ConfigError`` naming the key otherwise."""
    if cfg.data.targets != "values":
        return
    if task != "regression":
        raise ConfigError("data.targets", f"values are real-valued targets: set task: regression, not {task}")
    if cfg.algorithm.get("weighting") == "label_kl":
        raise ConfigError(
            "algorithm.weighting",
            "label_kl weighs clients by class-label histograms, which real-valued targets (data.targets: values) "
            "do not have; use samples, uniform or quality",
        )
