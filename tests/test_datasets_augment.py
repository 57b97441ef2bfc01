"""Image augmentation per batch (random crop with padding, horizontal flip), drawn from the client's generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pfl_mpi.data import DataConfig, load_federated
from pfl_mpi.data.augment import make_augmenter
from pfl_mpi.data.config import AugmentConfig
from pfl_mpi.errors import ConfigError


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference(x: np.ndarray, seed: int, pad: int, flip: bool) -> np.ndarray:
    """The documented draws (B row offsets, B column offsets, then B coins), applied one sample at a time."""
    g = _generator(seed)
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=g).numpy() if pad else np.zeros((2, b), int)
    coins = torch.randint(0, 2, (b,), generator=g).numpy() if flip else np.zeros(b, int)
    out = np.empty_like(x)
    for i in range(b):
        padded = np.pad(x[i], ((0, 0), (pad, pad), (pad, pad)))
        crop = padded[:, offsets[0, i] : offsets[0, i] + h, offsets[1, i] : offsets[1, i] + w]
        out[i] = crop[:, :, ::-1] if coins[i] else crop
    return out


@pytest.mark.parametrize(("pad", "flip"), [(4, True), (4, False), (0, True), (2, True)])
def test_augmenter_matches_a_per_sample_reference(pad: int, flip: bool) -> None:
    x = torch.randn(16, 3, 8, 7, generator=_generator(1))
    augment = make_augmenter(AugmentConfig(crop_padding=pad, flip=flip), (3, 8, 7))
    out = augment(x, _generator(5))
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(out.numpy(), _reference(x.numpy(), 5, pad, flip))


def test_augmenter_depends_on_the_generator_state_only() -> None:
    x = torch.randn(32, 3, 8, 8, generator=_generator(2))
    augment = make_augmenter(AugmentConfig(), (3, 8, 8))
    a, b = augment(x, _generator(9)), augment(x.clone(), _generator(9))
    assert torch.equal(a, b) and not torch.equal(a, augment(x, _generator(10)))
    g = _generator(9)
    augment(x, g)  # advances the client's generator by its draws, like any other use of it
    assert not torch.equal(g.get_state(), _generator(9).get_state())


def test_augmentation_off_or_on_non_images() -> None:
    assert make_augmenter(None, (3, 32, 32)) is None
    assert make_augmenter(AugmentConfig(crop_padding=0, flip=False), (3, 32, 32)) is None
    assert load_federated(DataConfig(name="digits", num_clients=5), 0).augment is None
    fd = load_federated(DataConfig(name="digits", num_clients=5, augment={"crop_padding": 1}), 0)
    assert fd.augment is not None and fd.augment(torch.zeros(2, 1, 8, 8), _generator(0)).shape == (2, 1, 8, 8)
    with pytest.raises(ConfigError) as info:
        load_federated(DataConfig(name="synthetic", num_clients=5, augment={}), 0)
    assert info.value.key == "data.augment"
