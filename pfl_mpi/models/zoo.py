"""Networks of the literature, as stacks of layers for ``nets._split`` (base/head split by ``head_layers``).

Each builder returns ``(pre, layers, flat_from)`` like the builders in ``nets.py``: ``layers`` is the list of
*layers* (a parameterised module with what follows it), the Flatten goes before ``layers[flat_from]``.

- ``pfedhn_cnn``: the target CNN of pFedHN (Shamsian et al., ICML 2021, their ``CNNTarget``) for 32 x 32 x 3:
  conv 5x5 3->16, ReLU, max-pool 2, conv 5x5 16->32, ReLU, max-pool 2, fc 800->120, fc 120->84, fc 84->C (ReLU
  after the hidden fc layers); no padding. 5 layers. Inputs must be at least 16 x 16 (exact sizes at 32 x 32).
- ``resnet18``: ResNet-18 (He et al., CVPR 2016) in its CIFAR form (3x3 stem of 64 channels, stride 1, no
  max-pool), BasicBlocks [2, 2, 2, 2] of 64, 128, 256, 512 channels, strides 1, 2, 2, 2, global average pool,
  fc 512->C; every BatchNorm replaced by GroupNorm with ``groupnorm_groups`` groups (2, as in Hsieh et al.,
  ICML 2020, and Reddi et al., ICLR 2021: BatchNorm's statistics break under non-IID clients). 11.2 M parameters
  for C = 10. Layers: stem, 8 blocks (the last with the pool), fc: 10.
- ``resnet8``: the CIFAR ResNet of He et al. with n = 1 (6n + 2 = 8 weighted layers: a 3x3 stem of 16 channels,
  one BasicBlock per stage of 16, 32, 64 channels with strides 1, 2, 2, global average pool, fc 64->C), the
  ResNet-8 of FedDF (Lin et al., NeurIPS 2020), with GroupNorm. 78 k parameters for C = 10. Layers: 5.
- ``femnist_cnn``: LEAF's FEMNIST CNN (Caldas et al. 2018, ``models/femnist/cnn.py``): conv 5x5 1->32 'same',
  ReLU, max-pool 2, conv 5x5 32->64 'same', ReLU, max-pool 2, fc 3136->2048, ReLU, fc 2048->62 for 28 x 28. 4 layers.
- ``shakespeare_lstm``: LEAF's next-character model (``models/shakespeare/stacked_lstm.py``; McMahan et al.
  2017): embedding of the 80-letter vocabulary to 8, a 2-layer LSTM of 256 units, fc 256->C on the last step's
  output. Input: int64 token ids [L]. 2 layers (the LSTM with its embedding, then fc).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pfl_mpi.errors import ConfigError

Named = list[tuple[str, nn.Module]]
Built = tuple[Named, list[Named], int]


def _image(shape: tuple[int, ...], name: str, smallest: int) -> tuple[Named, int, int, int]:
    """(pre, channels, H, W) of an image input (C, H, W) or (H, W) of at least ``smallest`` pixels a side."""
    if len(shape) not in (2, 3):
        raise ConfigError("model.name", f"{name} needs inputs of shape (channels, H, W) or (H, W), got {shape}")
    pre: Named = [("unflatten", nn.Unflatten(1, (1, *shape)))] if len(shape) == 2 else []
    c, h, w = (1, *shape) if len(shape) == 2 else shape
    if min(h, w) < smallest:
        raise ConfigError("model.name", f"{name} needs images of at least {smallest} x {smallest}, got {h} x {w}")
    return pre, c, h, w


def _fc(d: int, widths: list[int], num_classes: int) -> list[Named]:
    layers: list[Named] = []
    for i, width in enumerate(widths, start=1):
        layers.append([(f"fc{i}", nn.Linear(d, width)), (f"fc{i}_relu", nn.ReLU())])
        d = width
    layers.append([(f"fc{len(widths) + 1}", nn.Linear(d, num_classes))])
    return layers


def pfedhn_cnn(cfg, shape: tuple[int, ...], num_classes: int) -> Built:
    pre, c, h, w = _image(shape, "pfedhn_cnn", 16)
    layers: list[Named] = []
    for i, (a, b) in enumerate([(c, 16), (16, 32)], start=1):
        layers.append([(f"conv{i}", nn.Conv2d(a, b, 5)), (f"relu{i}", nn.ReLU()), (f"pool{i}", nn.MaxPool2d(2, 2))])
    side = lambda n: ((n - 4) // 2 - 4) // 2  # noqa: E731 - two (conv 5, pool 2)
    return pre, layers + _fc(32 * side(h) * side(w), [120, 84], num_classes), 2


def femnist_cnn(cfg, shape: tuple[int, ...], num_classes: int) -> Built:
    pre, c, h, w = _image(shape, "femnist_cnn", 4)
    layers: list[Named] = []
    for i, (a, b) in enumerate([(c, 32), (32, 64)], start=1):
        conv = nn.Conv2d(a, b, 5, padding=2)
        layers.append([(f"conv{i}", conv), (f"relu{i}", nn.ReLU()), (f"pool{i}", nn.MaxPool2d(2, 2))])
    return pre, layers + _fc(64 * (h // 4) * (w // 4), [2048], num_classes), 2


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm, and the identity (or a 1x1 convolution with GroupNorm) added."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.GroupNorm(groups, c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


def _resnet(cfg, shape: tuple[int, ...], num_classes: int, widths: list[int], blocks: int, name: str) -> Built:
    pre, c, _, _ = _image(shape, name, 4)
    g = cfg.groupnorm_groups
    bad = [w for w in widths if w % g]
    if bad:
        raise ConfigError("model.groupnorm_groups", f"{g} groups do not divide {name}'s {bad[0]} channels")
    stem = [("conv1", nn.Conv2d(c, widths[0], 3, padding=1, bias=False)), ("norm1", nn.GroupNorm(g, widths[0]))]
    layers: list[Named] = [[*stem, ("relu1", nn.ReLU())]]
    c_in, i = widths[0], 1
    for stage, width in enumerate(widths):
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            layers.append([(f"block{i}", BasicBlock(c_in, width, stride, g))])
            c_in, i = width, i + 1
    layers[-1].append(("pool", nn.AdaptiveAvgPool2d(1)))
    return pre, layers + [[("fc", nn.Linear(c_in, num_classes))]], len(layers)


def resnet18(cfg, shape: tuple[int, ...], num_classes: int) -> Built:
    return _resnet(cfg, shape, num_classes, [64, 128, 256, 512], 2, "resnet18")


def resnet8(cfg, shape: tuple[int, ...], num_classes: int) -> Built:
    return _resnet(cfg, shape, num_classes, [16, 32, 64], 1, "resnet8")


class CharLSTM(nn.Module):
    """Token ids [B, L] -> the last step's output of a stacked LSTM over their embeddings, [B, hidden]."""

    def __init__(self, vocab: int, embedding: int, hidden: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, embedding)
        self.lstm = nn.LSTM(embedding, hidden, num_layers=layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x.long()))
        return out[:, -1, :]


def shakespeare_lstm(cfg, shape: tuple[int, ...], num_classes: int) -> Built:
    if len(shape) != 1:
        raise ConfigError("model.name", f"shakespeare_lstm needs token sequences of shape (length,), got {shape}")
    vocab = cfg.vocab_size or num_classes
    lstm = CharLSTM(vocab, cfg.embedding_dim, cfg.lstm_hidden, cfg.lstm_layers)
    return [], [[("lstm", lstm)], [("fc", nn.Linear(cfg.lstm_hidden, num_classes))]], 1


BUILDERS = {
    "pfedhn_cnn": pfedhn_cnn,
    "femnist_cnn": femnist_cnn,
    "resnet8": resnet8,
    "resnet18": resnet18,
    "shakespeare_lstm": shakespeare_lstm,
}
LAYERS = {"pfedhn_cnn": 5, "femnist_cnn": 4, "resnet8": 5, "resnet18": 10, "shakespeare_lstm": 2}


def parameter_count(model: nn.Module) -> int:
    """Number of parameters (for the documented sizes)."""
    return sum(math.prod(p.shape) for p in model.parameters())
