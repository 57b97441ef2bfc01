"""Image augmentation of training batches on the device, without a DataLoader (``data.augment``).

``make_augmenter(cfg, input_shape)`` returns a pure function ``augment(x, generator) -> x'`` for batches
``x`` of shape [B, C, H, W] on any device: a random crop after zero padding of ``crop_padding`` pixels on
each side (as torchvision's ``RandomCrop(H, padding=p)``), then a horizontal flip with probability 1/2. All
randomness is drawn from ``generator`` (a CPU ``torch.Generator``, the client's generator of the round) in a
fixed order: B crop offsets in rows, B in columns, then B flip coins. The result is therefore a function of
(x, generator state) alone, whatever the device or the rank, which keeps placement invariance. The padding is
zeros of the normalised image, i.e. the data set's mean colour for CIFAR.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pfl_mpi.data.config import AugmentConfig
from pfl_mpi.errors import ConfigError

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def make_augmenter(cfg: AugmentConfig | None, input_shape: tuple[int, ...]) -> Augment | None:
    """The augmentation of ``cfg`` for samples of ``input_shape`` (C, H, W); None when off or a no-op."""
    if cfg is None or (cfg.crop_padding == 0 and not cfg.flip):
        return None
    if len(input_shape) != 3:
        raise ConfigError("data.augment", f"needs images of shape (channels, H, W), the data have {input_shape}")
    pad, flip = cfg.crop_padding, cfg.flip

    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return augment_batch(x, generator, pad, flip)

    return augment


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int, flip: bool) -> torch.Tensor:
    """Random crop of ``x`` [B, C, H, W] zero-padded by ``pad``, then random horizontal flips (``flip``)."""
    b, _, h, w = x.shape
    if pad:
        offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device)
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [B, 1, H, 1]
        cols = (offsets[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [B, 1, 1, W]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, channel, rows, cols]
    if flip:
        coins = torch.randint(0, 2, (b,), generator=generator).to(x.device).bool()
        x = torch.where(coins[:, None, None, None], x.flip(3), x)
    return x
