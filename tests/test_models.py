"""Target networks (base/head split) and flat parameter layouts."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from pfl_mpi.errors import ConfigError
from pfl_mpi.models import ModelConfig, ParamLayout, build_model, split_names

DIGITS, MNIST1D, SYNTHETIC, CIFAR = (1, 8, 8), (1, 40), (60,), (3, 32, 32)

# every model with every data shape it accepts
CASES = [
    ("logreg", DIGITS),
    ("logreg", MNIST1D),
    ("logreg", SYNTHETIC),
    ("mlp", DIGITS),
    ("mlp", MNIST1D),
    ("mlp", SYNTHETIC),
    ("cnn1d", MNIST1D),
    ("cnn1d", SYNTHETIC),
    ("cnn2d", DIGITS),
    ("cnn2d", CIFAR),
    ("pfedhn_cnn", CIFAR),
    ("resnet8", CIFAR),
    ("resnet8", DIGITS),
]
BIG = [("resnet18", CIFAR), ("femnist_cnn", (1, 28, 28))]  # shape and split tests only: SGD on them is slow here
LAYERS = {
    "logreg": 1,
    "mlp": 2,
    "cnn1d": 4,
    "cnn2d": 5,
    "pfedhn_cnn": 5,
    "resnet8": 5,
    "resnet18": 10,
    "femnist_cnn": 4,
}


def _build(name: str, shape: tuple[int, ...], seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name=name, **kw), shape, 10)


@pytest.mark.parametrize("name,shape", CASES + BIG)
def test_output_shape_and_split(name, shape):
    model = _build(name, shape)
    assert [n for n, _ in model.named_children()] == ["base", "head"]
    x = torch.randn(5, *shape)
    out = model(x)
    assert out.shape == (5, 10)
    feats = model.base(x)
    assert feats.shape == (5, model.feature_dim)
    torch.testing.assert_close(out, model.head(feats), rtol=0, atol=0)
    names = [n for n, _ in model.named_parameters()]
    assert names and all(n.startswith(("base.", "head.")) for n in names)


@pytest.mark.parametrize("name,shape", CASES + BIG)
def test_every_head_size(name, shape):
    """Any head_layers up to the number of layers works; base output stays flat; init ignores the split."""
    ref = dict(_build(name, shape, seed=3).named_parameters())
    ref = {n.split(".", 1)[1]: p for n, p in ref.items()}
    x = torch.randn(3, *shape)
    for k in range(1, LAYERS[name] + 1):
        model = _build(name, shape, seed=3, head_layers=k)
        assert model.base(x).shape == (3, model.feature_dim)
        torch.testing.assert_close(model(x), model.head(model.base(x)), rtol=0, atol=0)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, ref[n.split(".", 1)[1]], rtol=0, atol=0)
    with pytest.raises(ConfigError) as err:
        _build(name, shape, head_layers=LAYERS[name] + 1)
    assert err.value.key == "model.head_layers"


def _layers(names: list[str], prefix: str) -> set[str]:
    return {n.split(".")[1] for n in names if n.startswith(prefix)}


@pytest.mark.parametrize("name,shape", [("mlp", SYNTHETIC), ("cnn1d", MNIST1D), ("cnn2d", DIGITS)])
def test_head_layers_two_moves_one_layer(name, shape):
    one = [n for n, _ in _build(name, shape, head_layers=1).named_parameters()]
    two = [n for n, _ in _build(name, shape, head_layers=2).named_parameters()]
    moved = _layers(two, "head.") - _layers(one, "head.")
    assert len(moved) == 1
    assert _layers(one, "base.") - _layers(two, "base.") == moved
    assert len(_layers(two, "head.")) == 2


def test_named_layers():
    names = [n for n, _ in _build("cnn2d", CIFAR).named_parameters()]
    assert names[:2] == ["base.conv1.weight", "base.conv1.bias"]
    assert names[-2:] == ["head.fc3.weight", "head.fc3.bias"]
    logreg = _build("logreg", SYNTHETIC)
    assert sum(p.numel() for p in logreg.base.parameters()) == 0
    assert [n for n, _ in logreg.named_parameters()] == ["head.fc1.weight", "head.fc1.bias"]


def test_paper_geometries():
    cifar = _build("cnn2d", CIFAR, head_layers=3)  # base = the two conv blocks
    assert cifar.feature_dim == 32 * 5 * 5
    assert cifar.base.conv1.kernel_size == (5, 5)
    assert _build("cnn2d", DIGITS, head_layers=3).feature_dim == 32 * 2 * 2
    assert _build("cnn1d", MNIST1D).feature_dim == 25 * 5
    mlp = _build("mlp", DIGITS, hidden=[32, 16])
    assert mlp.feature_dim == 16
    assert LAYERS["mlp"] == ModelConfig(name="mlp").num_layers()


def test_shape_mismatch_and_config_errors():
    with pytest.raises(ConfigError, match="cnn2d"):
        _build("cnn2d", SYNTHETIC)
    with pytest.raises(ConfigError, match="cnn1d"):
        _build("cnn1d", DIGITS)
    with pytest.raises(ConfigError):
        _build("cnn2d", (1, 2, 2))
    with pytest.raises(ValidationError):
        ModelConfig(head_layers=0)
    with pytest.raises(ValidationError):
        ModelConfig(hidden=[0])
    with pytest.raises(ValidationError):
        ModelConfig(widths=[3])


@pytest.mark.parametrize("name,shape", CASES)
def test_seed_gives_identical_init(name, shape):
    a, b, c = _build(name, shape, seed=7), _build(name, shape, seed=7), _build(name, shape, seed=8)
    pa, pb, pc = (list(m.parameters()) for m in (a, b, c))
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)
    assert any(not torch.equal(x, z) for x, z in zip(pa, pc, strict=True))


def test_layout_round_trip_touches_only_its_names():
    model = _build("cnn2d", DIGITS)
    shared, personal = split_names(model, lambda n: n.startswith("head."))
    assert shared + personal == [n for n, _ in model.named_parameters()]
    assert personal == ["head.fc3.weight", "head.fc3.bias"]
    layout = ParamLayout(model, shared)
    assert layout.names == tuple(shared)
    assert layout.numel == sum(model.get_parameter(n).numel() for n in shared)
    flat = layout.flatten(model)
    assert flat.shape == (layout.numel,) and flat.dtype == torch.float32 and flat.is_contiguous()
    assert not flat.requires_grad
    before = {n: model.get_parameter(n).detach().clone() for n in personal}
    new = torch.randn(layout.numel, dtype=torch.float64)
    layout.load(model, new)
    assert torch.equal(layout.flatten(model), new.float())
    for n in personal:
        assert torch.equal(model.get_parameter(n), before[n])
    flat2 = layout.flatten(model)
    flat2 += 1  # a copy: editing it does not touch the model
    assert torch.equal(layout.flatten(model), new.float())
    first = shared[0]
    torch.testing.assert_close(
        model.get_parameter(first).reshape(-1), new[: model.get_parameter(first).numel()].float()
    )
    with pytest.raises(ValueError):
        layout.load(model, torch.zeros(layout.numel + 1))


def test_layout_applies_to_another_instance():
    a, b = _build("mlp", SYNTHETIC, seed=1), _build("mlp", SYNTHETIC, seed=2)
    layout = ParamLayout(a, [n for n, _ in a.named_parameters()])
    layout.load(b, layout.flatten(a))
    x = torch.randn(4, *SYNTHETIC)
    assert torch.equal(a(x), b(x))
    with pytest.raises(KeyError):
        ParamLayout(a, ["base.nope"])


def test_grads_match_parameter_grads():
    model = _build("cnn1d", MNIST1D)
    names = [n for n, _ in model.named_parameters()]
    layout = ParamLayout(model, names)
    assert torch.equal(layout.grads(model), torch.zeros(layout.numel))
    model.head.zero_grad()
    x, y = torch.randn(8, *MNIST1D), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    model.base.conv1.bias.grad = None  # a parameter without gradient contributes zeros
    expected = torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.reshape(-1) for p in model.parameters()])
    got = layout.grads(model)
    assert got.shape == (layout.numel,) and got.dtype == torch.float32
    assert torch.equal(got, expected)
    assert got.abs().sum() > 0


@pytest.mark.parametrize("name,shape", CASES)
def test_sgd_learns_a_fixed_batch(name, shape):
    model = _build(name, shape)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, *shape, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]  # seeded, so deterministic


# -- networks of the literature (pfl_mpi/models/zoo.py) ------------------------------------------------------


def _conv(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def _block(c_in: int, c_out: int) -> int:
    """A GroupNorm BasicBlock: two 3x3 convolutions, two norms, and a 1x1 projection when the shape changes."""
    body = _conv(c_in, c_out, 3, False) + _conv(c_out, c_out, 3, False) + 4 * c_out
    return body + (_conv(c_in, c_out, 1, False) + 2 * c_out if c_in != c_out else 0)


def _lstm(n_in: int, hidden: int) -> int:
    return 4 * hidden * (n_in + hidden) + 2 * 4 * hidden  # torch keeps two bias vectors


PARAMETERS = [  # (name, input, classes, count from the reference layer sizes)
    ("pfedhn_cnn", CIFAR, 10, _conv(3, 16, 5) + _conv(16, 32, 5) + 800 * 120 + 120 + 120 * 84 + 84 + 84 * 10 + 10),
    ("femnist_cnn", (1, 28, 28), 62, _conv(1, 32, 5) + _conv(32, 64, 5) + 3136 * 2048 + 2048 + 2048 * 62 + 62),
    ("shakespeare_lstm", (80,), 80, 80 * 8 + _lstm(8, 256) + _lstm(256, 256) + 256 * 80 + 80),
    ("resnet8", CIFAR, 10, _conv(3, 16, 3, False) + 32 + _block(16, 16) + _block(16, 32) + _block(32, 64) + 650),
    ("resnet18", CIFAR, 10, 11_173_962),  # the CIFAR ResNet-18's usual count (GroupNorm has BatchNorm's 2 per channel)
]


@pytest.mark.parametrize("name,shape,classes,expected", PARAMETERS, ids=[p[0] for p in PARAMETERS])
def test_reference_sizes(name, shape, classes, expected):
    model = build_model(ModelConfig(name=name), shape, classes)
    assert sum(p.numel() for p in model.parameters()) == expected
    shared, personal = split_names(model, lambda n: n.startswith("head."))  # FedPer's split: the last layer
    assert personal == [n for n, _ in model.named_parameters() if n.startswith("head.")] and len(personal) == 2
    assert list(model.buffers()) == []  # GroupNorm, no running statistics to average by accident


def test_shakespeare_lstm_predicts_the_next_character_from_token_ids():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="shakespeare_lstm", head_layers=2), (80,), 80)
    x = torch.randint(0, 80, (4, 80))
    out = model(x)
    assert out.shape == (4, 80)
    torch.manual_seed(0)
    one = build_model(ModelConfig(name="shakespeare_lstm"), (80,), 80)
    assert one.feature_dim == 256 and [n for n, _ in one.head.named_parameters()] == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(one(x), out, rtol=0, atol=0)  # the split does not change the function
    opt = torch.optim.SGD(one.parameters(), lr=0.5)
    y = torch.randint(0, 80, (4,), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(one(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # seeded, so deterministic


def test_literature_networks_reject_what_does_not_fit():
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name="pfedhn_cnn"), DIGITS, 10)
    assert err.value.key == "model.name" and "16 x 16" in err.value.message
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name="resnet8", groupnorm_groups=3), CIFAR, 10)
    assert err.value.key == "model.groupnorm_groups"
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name="shakespeare_lstm"), CIFAR, 10)
    assert err.value.key == "model.name"
    with pytest.raises(ValidationError):
        ModelConfig(name="shakespeare_lstm", lstm_units=128)
    with pytest.raises(ConfigError) as err:  # a plain name may be a plugin's: known once plugins are imported
        build_model(ModelConfig(name="resnet34"), CIFAR, 10)
    assert err.value.key == "model.name" and "unknown network 'resnet34'" in err.value.message
