"""Building a run's algorithm as every rank builds it, and the check that does so before any rank starts."""

from __future__ import annotations

import torch

from ..algorithms import Algorithm, Setup, resolve
from ..config import RunConfig
from ..data import FederatedData
from ..errors import ConfigError
from ..models import build_models
from ..models.split import check_buffers_handled
from ..training.client_batch import choose_client_batch
from ..training.loop import TrainConfig
from ..training.tasks import model_outputs, probe_loss, resolve_task, training_loss
from .device import ranks_per_device


def build_algorithm(
    cfg: RunConfig, data: FederatedData, device: torch.device | None = None, local_size: int = 1
) -> Algorithm:
    """One model per architecture group (on ``device``; ``local_size``: the ranks of this node, which share its
    GPUs), the ``Setup`` and the algorithm of ``cfg``.

    The models are initialised from ``cfg.seed`` (``build_models``); raises ``ConfigError`` naming the key
    when the algorithm cannot use them or its parameters do not fit the model or the data."""
    device = device or torch.device("cpu")
    task = resolve_task(cfg.task, cfg.data.name)
    outputs = model_outputs(task, data.num_classes, data.targets)
    models = [m.to(device) for m in build_models(cfg.model, data.input_shape, outputs, cfg.seed)]
    cls, params = resolve(cfg.algorithm)
    cls.check_models(params, models)
    check_buffers_handled(cls, models)
    check_train_keys(cls, cfg.train, cfg.finetune_epochs)
    setup = Setup(
        models[0],
        device,
        cfg.train,
        data.num_clients,
        data.num_classes,
        cfg.seed,
        models=models,
        groups=cfg.model.groups(data.num_clients),
        train_sizes=data.train_sizes,
        test_sizes=data.test_sizes,
        public=data.public,
        augment=data.augment,
        rounds=cfg.rounds,
        task=task,
        loss=training_loss(task, cfg.train.loss),
    )
    setup.client_batch = resolve_client_batch(cfg, data, models[0], device, ranks_per_device(device, local_size))
    return cls(params, setup)


def resolve_client_batch(
    cfg: RunConfig, data: FederatedData, model: torch.nn.Module, device: torch.device, sharing: int = 1
) -> int:
    """``train.client_batch`` as K (``auto``: from the memory budget, the model, the largest client and the ranks
    ``sharing`` the device)."""
    if isinstance(cfg.train.client_batch, int):
        return cfg.train.client_batch
    sample = data.client(0).x_train[:1]
    return choose_client_batch(cfg.train, model, device, sample, int(max(data.train_sizes, default=1)), sharing)


def ignored_train_keys(cls: type[Algorithm], finetune_epochs: int) -> dict[str, str]:
    """The ``train`` keys a run of ``cls`` would ignore, each with the key that applies instead: those the
    algorithm replaces (``replaces_train``), except what fine-tuning uses when ``finetune_epochs`` > 0 (every key
    but ``local_epochs``: fine-tuning trains with the train section's optimiser for ``finetune_epochs``)."""
    return {k: v for k, v in cls.replaces_train.items() if not finetune_epochs or k == "local_epochs"}


def check_train_keys(cls: type[Algorithm], train: TrainConfig, finetune_epochs: int = 0) -> None:
    """Refuse a ``train`` key the run would ignore (``ignored_train_keys``) set to a value other than its
    default, with one line naming the key that applies instead."""
    defaults = TrainConfig()
    for key, instead in ignored_train_keys(cls, finetune_epochs).items():
        if getattr(train, key) != getattr(defaults, key):
            raise ConfigError(f"train.{key}", f"{cls.name} does not use train.{key}; set {instead}")


def check_buildable(cfg: RunConfig, data: FederatedData) -> None:
    """Build what every rank will build, so that an error of the configuration against the data (an
    architecture the samples do not fit, FedProto's unequal embeddings, top-k's k above the model size)
    is one ``ConfigError`` line before MPI starts, not a traceback on every rank; ``train.loss`` is tried on two
    samples of client 0. Leaves torch's RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        algo = build_algorithm(cfg, data)
        if cfg.train.loss is not None:
            first = data.client(0)
            probe_loss(algo.setup.loss, algo.setup.model, first.x_train, first.y_train)
