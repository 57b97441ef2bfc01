"""Tasks: what the model predicts, the loss it trains with by default, and the two metrics it is scored by.

- ``classification``: outputs ``[B, C]`` logits, targets int ``[B]``; cross-entropy, accuracy
  (``test_loss``, ``test_acc``).
- ``next_token``: outputs ``[B, V]`` (the next token of each sequence, LEAF's Shakespeare) or ``[B, T, V]`` (one
  prediction per position), targets int ``[B]`` or ``[B, T]``; cross-entropy and accuracy per token
  (``test_loss``, ``test_acc``: the mean over every predicted token).
- ``regression``: outputs with as many values per sample as the targets (``[B]``, ``[B, 1]`` or ``[B, D]``);
  mean squared error, root mean squared error (``test_mse``, ``test_rmse``). A file's real-valued targets
  (``data.targets: values``, y [n] or [n, k]) are regressed as float32 by a network with k outputs; integer
  labels (every built-in data set) by one output, the label as a number.

The config's ``task`` picks one (``auto``: ``next_token`` for Shakespeare, else ``classification``). A user loss
(``train.loss: package.module:function``) replaces the training objective only: ``function(outputs, targets)``
returns the scalar to minimise (the mean over the batch), e.g. ``torch.nn.functional.smooth_l1_loss``.
Evaluation keeps the task's metrics, so that runs with different losses compare on one scale.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .loop import Batch, LossFn, cross_entropy, evaluate

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``criterion(outputs, targets) -> scalar``: a user loss (``train.loss``), the mean over the batch."""

Evaluate = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[float, float]]


def token_cross_entropy(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy per token: the mean over every predicted position of every sequence of the batch."""
    logits = model(batch.x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.y.reshape(-1))
    return loss, {"train_loss": loss}


def squared_error(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean squared error of the outputs (reshaped to the targets' shape)."""
    out = model(batch.x)
    loss = F.mse_loss(out.reshape(batch.y.shape), batch.y.to(out.dtype))
    return loss, {"train_loss": loss}


@torch.no_grad()
def evaluate_tokens(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> tuple[float, float]:
    """Cross-entropy and accuracy per token of ``model`` on (x, y): sums over every target token, divided by
    their number."""
    model.eval()
    loss_sum, correct, tokens = 0.0, 0, 0
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start : start + batch_size])
        logits = logits.reshape(-1, logits.shape[-1])
        target = y[start : start + batch_size].reshape(-1)
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
        tokens += target.numel()
    return loss_sum / max(tokens, 1), correct / max(tokens, 1)


@torch.no_grad()
def evaluate_regression(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> tuple[float, float]:
    """Mean squared error and its square root, over every target value of (x, y)."""
    model.eval()
    sq_sum = 0.0
    for start in range(0, x.shape[0], batch_size):
        out = model(x[start : start + batch_size])
        target = y[start : start + batch_size].to(out.dtype)
        sq_sum += float(F.mse_loss(out.reshape(target.shape), target, reduction="sum"))
    mse = sq_sum / max(y.numel(), 1)
    return mse, math.sqrt(mse)


@dataclass(frozen=True)
class Task:
    """A task: its default training loss, its evaluation and the names of its two metrics."""

    name: str
    loss: LossFn  # the default training objective, reporting ``train_loss``
    evaluate: Evaluate  # (model, x, y) -> (loss metric, score metric)
    metrics: tuple[str, str]  # the two metrics' names: ("loss", "acc") or ("mse", "rmse")
    higher_is_better: bool  # of the score (accuracy: yes; RMSE: no)

    def columns(self, prefix: str = "test_") -> tuple[str, str]:
        """The names of the two metrics under ``prefix``: ``test_loss``, ``global_test_acc``, ``test_rmse``, ..."""
        return (prefix + self.metrics[0], prefix + self.metrics[1])

    def pooled_score(self, loss: float, score: float) -> float:
        """The round's score from the sample-weighted means of the clients' metrics: accuracy is the weighted
        mean itself; RMSE is the root of the pooled MSE (not the mean of the clients' roots)."""
        return math.sqrt(loss) if self.name == "regression" else score


TASKS: dict[str, Task] = {
    "classification": Task("classification", cross_entropy, evaluate, ("loss", "acc"), True),
    "next_token": Task("next_token", token_cross_entropy, evaluate_tokens, ("loss", "acc"), True),
    "regression": Task("regression", squared_error, evaluate_regression, ("mse", "rmse"), False),
}
CLASSIFICATION = TASKS["classification"]
TOKEN_DATA = ("shakespeare",)  # data sets whose samples are token sequences: task auto -> next_token


def model_outputs(task: Task, num_classes: int, targets: str = "labels") -> int:
    """The outputs the network is built with (its ``num_classes`` argument): for regression one per target value
    (``targets`` ``values``: the data's ``num_classes`` is the number of values per sample) or one for integer
    labels (the label as a number); else one per class. ``ConfigError`` naming ``data.targets`` when values
    would be trained by a task other than regression."""
    if targets == "values":
        if task.name != "regression":
            raise ConfigError("data.targets", f"values are real-valued targets: set task: regression, not {task.name}")
        return num_classes
    return 1 if task.name == "regression" else num_classes


def task_name(task: str, data_name: str) -> str:
    """The task a run trains: ``task`` itself, or for ``auto`` the one the data set implies."""
    if task != "auto":
        return task
    return "next_token" if data_name in TOKEN_DATA else "classification"


def resolve_task(task: str, data_name: str) -> Task:
    """The :class:`Task` of config ``task`` (``auto`` resolved from ``data.name``)."""
    return TASKS[task_name(task, data_name)]


def import_loss(spec: str) -> Criterion:
    """The function ``package.module:function`` names (config ``train.loss``), imported; ``ConfigError`` naming
    ``train.loss`` when it cannot be imported or cannot be called as ``function(outputs, targets)``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError("train.loss", f"{spec!r} must be written package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the config's to report
        raise ConfigError("train.loss", f"cannot import {module_name!r}: {type(err).__name__}: {err}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError("train.loss", f"module {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise ConfigError("train.loss", f"{spec} is not callable")
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        raise ConfigError("train.loss", f"{spec} cannot be called as {attr}(outputs, targets)") from None
    except ValueError:  # builtins without a signature: accepted, the first batch will tell
        pass
    return fn


def criterion_loss(fn: Criterion) -> LossFn:
    """The loop's loss hook from a user criterion: ``fn(model(x), y)``, reported as ``train_loss``."""

    def loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        value = fn(model(batch.x), batch.y)
        return value, {"train_loss": value}

    return loss


def probe_loss(loss: LossFn, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Try the training loss (``train.loss``) on the first two samples: ``ConfigError`` naming ``train.loss`` when
    it fails or does not return one floating-point number (a loss left unreduced, say)."""
    model.train()
    try:
        value, _ = loss(model, Batch(x[:2], y[:2], torch.arange(min(2, len(y))), 0))
    except Exception as err:  # noqa: BLE001 - whatever the user's function raised, in one line
        raise ConfigError("train.loss", f"failed on two samples of client 0: {type(err).__name__}: {err}") from None
    if not (isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point()):
        got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConfigError("train.loss", f"must return a scalar (the batch's mean), got {got}")


def training_loss(task: Task, spec: str | None) -> LossFn:
    """The clients' training objective: the user's ``train.loss`` if set, else the task's loss."""
    return task.loss if spec is None else criterion_loss(import_loss(spec))
