"""A plugin with user networks for the tests: a small ResNet with GroupNorm (factory ``user_models:resnet_gn``
and registered as ``tiny_resnet_gn``) and one with BatchNorm (``tiny_resnet_bn``), both for images (C, H, W)
or (H, W). Their head is ``fc``; the BatchNorm one also says so with a ``head_prefixes`` method."""

from __future__ import annotations

import torch
from torch import nn

from pfl_mpi.models import register_model


class Block(nn.Module):
    """conv 3x3 -> norm -> ReLU -> conv 3x3 -> norm, plus the input."""

    def __init__(self, width: int, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm2 = norm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + x)


class TinyResNet(nn.Module):
    """stem conv + norm, ``blocks`` residual blocks, global average pool, fc."""

    def __init__(self, input_shape, num_classes: int, width: int, blocks: int, norm):
        super().__init__()
        self.shape = tuple(input_shape) if len(input_shape) == 3 else (1, *input_shape)
        self.stem = nn.Conv2d(self.shape[0], width, 3, padding=1, bias=False)
        self.norm = norm(width)
        self.blocks = nn.Sequential(*(Block(width, norm) for _ in range(blocks)))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.stem(x.reshape(-1, *self.shape))))
        return self.fc(self.blocks(x).mean(dim=(2, 3)))


class TinyResNetBN(TinyResNet):
    def head_prefixes(self) -> list[str]:
        return ["fc"]


def resnet_gn(input_shape, num_classes: int, width: int = 8, blocks: int = 1, groups: int = 2) -> nn.Module:
    """GroupNorm with ``groups`` groups (no buffers)."""
    return TinyResNet(input_shape, num_classes, width, blocks, lambda c: nn.GroupNorm(groups, c))


@register_model("tiny_resnet_bn")
def resnet_bn(input_shape, num_classes: int, width: int = 8, blocks: int = 1) -> nn.Module:
    """BatchNorm: running mean, variance and batch count are buffers."""
    return TinyResNetBN(input_shape, num_classes, width, blocks, nn.BatchNorm2d)


register_model("tiny_resnet_gn", resnet_gn)


class WrongHead(TinyResNet):
    def head_prefixes(self) -> list[str]:
        return ["classifier"]


@register_model("wrong_head")
def wrong_head(input_shape, num_classes: int) -> nn.Module:
    return WrongHead(input_shape, num_classes, 4, 1, lambda c: nn.GroupNorm(2, c))


def not_a_module(input_shape, num_classes: int):
    return "a string"


class SplitNet(nn.Module):
    """``head(base(x))`` with a flat embedding of ``feature_dim``: what FedProto, FedGKT and FedGen need."""

    def __init__(self, input_shape, num_classes: int, width: int):
        super().__init__()
        channels = input_shape[0] if len(input_shape) == 3 else 1
        self.base = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.GroupNorm(2, width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(width, num_classes)
        self.feature_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x))


@register_model("tiny_split")
def split_net(input_shape, num_classes: int, width: int = 16) -> nn.Module:
    return SplitNet(input_shape, num_classes, width)
