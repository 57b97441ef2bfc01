"""Target networks, each split into a ``base`` (feature extractor) and a ``head`` (classifier).

Every network is a stack of *layers*; a layer is one parameterised module with what follows it (a Linear
or a convolution, its ReLU and, for ``cnn2d``, its max-pool). ``head_layers = k`` puts the last k layers in
``head`` and the rest in ``base``. ``base(x)`` is always flat, ``[batch, d]``: when the split falls among
the convolutions, ``base`` ends with a Flatten and ``head`` begins with the matching Unflatten. Parameter
names do not depend on the split apart from their ``base.``/``head.`` prefix (``base.conv1.weight``,
``head.fc3.bias``, ...), and neither do the initial values: the modules are created in the same order
whatever ``head_layers`` is.

Networks:

- ``logreg``: ``base`` = Flatten, ``head`` = Linear(d, C).
- ``mlp``: Flatten, then Linear+ReLU per entry of ``hidden`` (``fc1``, ``fc2``, ...), then the output Linear.
- ``cnn1d``: the MNIST-1D CNN (Greydanus 2020, its reference ``ConvBase``): three Conv1d with 25 channels,
  stride 2, padding 1 and kernels 5, 3, 3, each followed by ReLU, then Linear to C. For MNIST-1D's length 40
  the feature vector has 25 x 5 = 125 entries, as in the reference. Input ``(L,)`` or ``(channels, L)``,
  any L >= 3.
- ``cnn2d``: the LeNet-style target network of pFedHN (Shamsian et al. 2021): conv 16 -> ReLU -> maxpool 2
  -> conv 32 -> ReLU -> maxpool 2 -> fc 120 -> fc 84 -> fc C (ReLU after the hidden fc layers). For inputs
  of at least 16 x 16 the convolutions are 5 x 5 without padding, exactly as in the paper (32 x 32 x 3
  CIFAR gives 32 x 5 x 5 = 800 features). Smaller images (e.g. the 8 x 8 digits) would vanish under two
  unpadded 5 x 5 convolutions, so there the convolutions are 3 x 3 with padding 1 (size-preserving) and only
  the pools shrink the image: 8 x 8 -> 4 x 4 -> 2 x 2, i.e. 32 x 2 x 2 = 128 features. Input ``(C, H, W)``
  or ``(H, W)``, H, W >= 4.
- ``pfedhn_cnn``, ``resnet8``, ``resnet18``, ``femnist_cnn``, ``shakespeare_lstm``: networks of the literature
  with their reference sizes, in ``zoo.py``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from pfl_mpi.errors import ConfigError
from pfl_mpi.models import zoo
from pfl_mpi.models.config import ArchitectureConfig, ModelConfig
from pfl_mpi.models.split import check_buffers, check_head, declare

Named = list[tuple[str, nn.Module]]


class SplitModel(nn.Module):
    """``forward(x) = head(base(x))``; ``base(x)`` is the flat feature embedding of size ``feature_dim``."""

    def __init__(self, base: nn.Sequential, head: nn.Sequential, feature_dim: int, num_classes: int):
        super().__init__()
        self.base = base
        self.head = head
        self.feature_dim = feature_dim
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x))

    def head_prefixes(self) -> tuple[str, ...]:
        """The declared head (``models.split``): the ``head`` module."""
        return ("head",)


def build_models(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int) -> list[nn.Module]:
    """One network per architecture group of ``cfg`` (``cfg.specs()``), each initialised from ``seed``.

    Every architecture is built right after ``torch.manual_seed(seed)``, as a run with that architecture
    alone would build it; the global random state is left as after building the first one (so one
    architecture gives exactly what ``torch.manual_seed(seed); build_model(cfg, ...)`` gives).
    A ConfigError of entry g names ``model.architectures.<g>.<key>``.
    """
    models = []
    torch.manual_seed(seed)
    for g, spec in enumerate(cfg.specs()):
        try:
            if g == 0:
                models.append(build_model(spec, input_shape, num_classes))
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                models.append(build_model(spec, input_shape, num_classes))
        except ConfigError as err:
            if not cfg.architectures:
                raise
            raise ConfigError(err.key.replace("model.", f"model.architectures.{g}.", 1), err.message) from None
    return models


def build_model(cfg: ArchitectureConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the network of ``cfg`` for samples of shape ``input_shape`` (without batch) and ``num_classes``:
    a built-in ``SplitModel`` or the module a user factory returns (``models.user``), with the section's
    ``head`` and ``buffers`` declared on it (``models.split``).

    Initialisation is torch's default, so it is determined by the torch seed at the time of the call.
    Raises ConfigError when ``head_layers`` exceeds the number of layers or the input shape does not fit.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if not input_shape or min(input_shape) < 1:
        raise ConfigError("model.name", f"invalid input shape {input_shape}")
    if num_classes < 1:
        raise ConfigError("model.name", f"invalid number of classes {num_classes}")
    if cfg.builtin:
        model = _build_builtin(cfg, input_shape, num_classes)
    else:
        from pfl_mpi.models.user import build_network

        model = build_network(cfg, input_shape, num_classes)
    declare(model, cfg.head, cfg.buffers)
    check_head(model)
    check_buffers(model)
    return model


def _build_builtin(cfg: ArchitectureConfig, input_shape: tuple[int, ...], num_classes: int) -> SplitModel:
    n_layers = cfg.num_layers()
    if cfg.head_layers > n_layers:
        raise ConfigError(
            "model.head_layers",
            f"{cfg.head_layers} head layers asked but {cfg.name} has only {n_layers} layers",
        )
    pre, layers, flat_from = _BUILDERS[cfg.name](cfg, input_shape, num_classes)
    assert len(layers) == n_layers
    return _split(pre, layers, flat_from, n_layers - cfg.head_layers, input_shape, num_classes)


def _dense(cfg: ModelConfig, shape: tuple[int, ...], num_classes: int) -> tuple[Named, list[Named], int]:
    d = math.prod(shape)
    widths = [] if cfg.name == "logreg" else list(cfg.hidden)
    return [], _fc_stack(d, widths, num_classes, first=1), 0


def _cnn1d(cfg: ModelConfig, shape: tuple[int, ...], num_classes: int) -> tuple[Named, list[Named], int]:
    if len(shape) not in (1, 2):
        raise ConfigError("model.name", f"cnn1d needs inputs of shape (length,) or (channels, length), got {shape}")
    pre: Named = [("unflatten", nn.Unflatten(1, (1, shape[0])))] if len(shape) == 1 else []
    c_in = 1 if len(shape) == 1 else shape[0]
    ch = cfg.cnn1d_channels
    layers: list[Named] = []
    for i, (c, k) in enumerate([(c_in, 5), (ch, 3), (ch, 3)], start=1):
        layers.append([(f"conv{i}", nn.Conv1d(c, ch, k, stride=2, padding=1)), (f"relu{i}", nn.ReLU())])
    d = math.prod(_out_shape(pre + _concat(layers), shape, "cnn1d"))
    return pre, layers + _fc_stack(d, [], num_classes, first=1), len(layers)


def _cnn2d(cfg: ModelConfig, shape: tuple[int, ...], num_classes: int) -> tuple[Named, list[Named], int]:
    if len(shape) not in (2, 3):
        raise ConfigError("model.name", f"cnn2d needs inputs of shape (channels, H, W) or (H, W), got {shape}")
    pre: Named = [("unflatten", nn.Unflatten(1, (1, shape[0])))] if len(shape) == 2 else []
    c_in, h, w = (1, *shape) if len(shape) == 2 else shape
    kernel, pad = (5, 0) if min(h, w) >= 16 else (3, 1)
    ch = cfg.cnn2d_channels
    layers: list[Named] = []
    for i, (a, b) in enumerate([(c_in, ch), (ch, 2 * ch)], start=1):
        layers.append(
            [
                (f"conv{i}", nn.Conv2d(a, b, kernel, padding=pad)),
                (f"relu{i}", nn.ReLU()),
                (f"pool{i}", nn.MaxPool2d(2, 2)),
            ]
        )
    d = math.prod(_out_shape(pre + _concat(layers), shape, "cnn2d"))
    return pre, layers + _fc_stack(d, list(cfg.cnn2d_fc), num_classes, first=1), len(layers)


_BUILDERS = {"logreg": _dense, "mlp": _dense, "cnn1d": _cnn1d, "cnn2d": _cnn2d, **zoo.BUILDERS}


def _fc_stack(d: int, widths: Sequence[int], num_classes: int, first: int) -> list[Named]:
    """Linear+ReLU per hidden width, then the output Linear; named fc<first>, fc<first+1>, ..."""
    layers: list[Named] = []
    for i, w in enumerate(widths, start=first):
        layers.append([(f"fc{i}", nn.Linear(d, w)), (f"fc{i}_relu", nn.ReLU())])
        d = w
    layers.append([(f"fc{first + len(widths)}", nn.Linear(d, num_classes))])
    return layers


def _concat(layers: Sequence[Named]) -> Named:
    return [m for layer in layers for m in layer]


@torch.no_grad()
def _out_shape(modules: Named, shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    """Shape (without batch) of ``modules`` applied to one sample of ``shape``; ConfigError if it fails."""
    x = torch.zeros(1, *shape)
    try:
        for _, m in modules:
            x = m(x)
    except RuntimeError as e:
        raise ConfigError("model.name", f"{name} cannot take inputs of shape {shape}: {e}") from None
    if x.numel() == 0:
        raise ConfigError("model.name", f"{name} cannot take inputs of shape {shape}: they shrink to nothing")
    return tuple(x.shape[1:])


def _split(
    pre: Named, layers: list[Named], flat_from: int, k: int, shape: tuple[int, ...], num_classes: int
) -> SplitModel:
    """``base`` = pre + layers[:k], ``head`` = layers[k:], with a Flatten before ``layers[flat_from]``."""
    if flat_from <= k:  # the flattening happens inside the base
        base = pre + _concat(layers[:flat_from]) + [("flatten", nn.Flatten())] + _concat(layers[flat_from:k])
        head = _concat(layers[k:])
    else:  # the split falls among the convolutions: base hands over a flat vector, head restores the shape
        base = pre + _concat(layers[:k])
        feat = _out_shape(base, shape, "model")
        base.append(("flatten", nn.Flatten()))
        head = [("unflatten", nn.Unflatten(1, feat))]
        head += _concat(layers[k:flat_from]) + [("flatten", nn.Flatten())] + _concat(layers[flat_from:])
    feature_dim = math.prod(_out_shape(base, shape, "model"))
    return SplitModel(nn.Sequential(OrderedDict(base)), nn.Sequential(OrderedDict(head)), feature_dim, num_classes)
