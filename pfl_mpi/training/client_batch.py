"""How many clients a block holds: ``train.client_batch`` as K (``auto``: the most clients whose block fits a
memory budget). See docs/batched.md, "Choosing K"."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .loop import TrainConfig

CPU_BUDGET_MB = 48.0  # ``auto`` on a CPU: blocks near the caches (W1: K = 26; K = 6-50 measured alike)
GPU_FRACTION = 0.5  # ``auto`` on a GPU: half of the device's memory
MAX_AUTO = 256


def client_bytes(model: nn.Module, cfg: TrainConfig, sample: torch.Tensor, max_samples: int) -> int:
    """An upper estimate of what one more client costs a block, in bytes: its parameters four times (the stack,
    the gradients, the momentum buffer, the autograd leaves), the activations of a batch three times (outputs,
    their gradients, what autograd saves), its data (the block's concatenated copy) and its batch plan."""
    numel = sum(p.numel() for p in model.parameters())
    activations = [0]

    def count(_module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            activations[0] += output[0].numel()  # per sample

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with torch.no_grad():
            model(sample[:1])
    finally:
        for h in hooks:
            h.remove()
    item = 4
    per_sample = item * (int(sample[0].numel()) + 1)
    steps = cfg.local_epochs * -(-max_samples // cfg.batch_size)
    plan = steps * cfg.batch_size * (8 + item) + steps * item
    return item * (4 * numel + 3 * cfg.batch_size * activations[0]) + per_sample * max_samples + plan


def budget_bytes(cfg: TrainConfig, device: torch.device, sharing: int = 1) -> int:
    """The memory a block may use: ``client_batch.memory_mb``, else the device's default (a GPU: its share of
    ``GPU_FRACTION`` of the memory when ``sharing`` ranks are bound to it)."""
    memory = getattr(cfg.client_batch, "memory_mb", None)
    if memory is not None:
        return int(memory * 2**20)
    if device.type == "cuda":
        return int(GPU_FRACTION * torch.cuda.get_device_properties(device).total_memory) // max(1, sharing)
    return int(CPU_BUDGET_MB * 2**20)


def choose_client_batch(
    cfg: TrainConfig,
    model: nn.Module,
    device: torch.device,
    sample: torch.Tensor,
    max_samples: int,
    sharing: int = 1,
) -> int:
    """K for ``train.client_batch``: the integer as given, or (``auto``) the most clients whose block fits the
    budget (``budget_bytes``; ``sharing``: the ranks bound to this GPU), at least 1 and at most ``MAX_AUTO``. A pure
    function of the configuration, the model, the device's kind and size and its sharing; K changes no result (a
    client's training does not depend on the clients of its block), only speed and memory."""
    if isinstance(cfg.client_batch, int):
        return cfg.client_batch
    per_client = client_bytes(model, cfg, sample.to(device), max_samples)
    return max(1, min(MAX_AUTO, budget_bytes(cfg, device, sharing) // per_client))


def batching_record(algo, input_shape: tuple[int, ...], x_dtype) -> dict[str, object]:
    """The run file's record of ``train.client_batch``: ``client_batch``, the K of the blocks a worker trains or
    evaluates (1 when nothing runs in blocks), and ``client_batch_use``, what runs in blocks or why nothing does
    (judged on a sample of zeros of the data's shape: a client's data of another kind falls back on its own)."""
    from .batched import batchable, task_loss
    from .block_eval import stacks_evaluation

    setup = algo.setup
    if setup.client_batch == 1:
        return {"client_batch": 1, "client_batch_use": "nothing (train.client_batch: 1)"}
    why = f"{algo.name} trains its clients one after another" if not algo.trains_in_blocks else None
    if why is None:
        x, y = torch.from_numpy(np.zeros((1, *input_shape), dtype=x_dtype)), torch.zeros(1, dtype=torch.int64)
        why = batchable(setup.model, setup.train, x, y, augment=setup.augment, loss=task_loss(setup))
    used = [what for what, on in (("training", why is None), ("evaluation", stacks_evaluation(algo))) if on]
    if not used:
        return {"client_batch": 1, "client_batch_use": f"nothing: {why}"}
    alone = f"; training one client at a time: {why}" if why else ""
    return {"client_batch": setup.client_batch, "client_batch_use": " and ".join(used) + alone}
