"""Batched clients (training/batched.py): K clients trained at once equal each client trained alone by the
library's loop; a client's result does not depend on its block; ``auto`` stays within its memory budget."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from pfl_mpi.config import load_config
from pfl_mpi.errors import ConfigError
from pfl_mpi.models import build_model
from pfl_mpi.models.config import ModelConfig
from pfl_mpi.training.batch_plan import plan_batches
from pfl_mpi.training.batched import batched_local_training
from pfl_mpi.training.client_batch import choose_client_batch, client_bytes
from pfl_mpi.training.loop import TrainConfig, epoch_batches, local_training, make_optimizer
from pfl_mpi.training.proximal import ProximalTerm
from pfl_mpi.training.stacked import stack

SIZES = [37, 20, 5, 64, 33]  # ragged last batches, different numbers of steps
EPOCHS = [2, 1, 3, 1, 2]


def _model(name: str, shape: tuple[int, ...]) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, hidden=[12, 8]).specs()[0], shape, 4)


def _clients(shape: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, *shape, generator=g), torch.randint(0, 4, (n,), generator=g)) for n in SIZES]


def _generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + i) for i in range(len(SIZES))]


def _sequential(model, start, data, cfg, *, anchors=None, mus=None):
    """Each client alone through ``local_training``: (its parameters, its mean loss)."""
    out = []
    for i, (x, y) in enumerate(data):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
        params = list(model.parameters())
        names = [n for n, _ in model.named_parameters()]
        reg = ProximalTerm(params, names, anchors[i], mus[i]) if anchors is not None else None
        means = local_training(
            model, x, y, cfg, _generators()[i], epochs=EPOCHS[i], regulariser=reg, optimizer=make_optimizer(params, cfg)
        )
        out.append(({n: p.detach().clone() for n, p in model.named_parameters()}, means["train_loss"]))
    return out


def _assert_close(stacked, i, params, rtol=1e-5, atol=1e-6):
    for n, p in params.items():
        torch.testing.assert_close(stacked[n][i], p, rtol=rtol, atol=atol, msg=n)


TRAIN_CASES = {
    "plain": {},
    "momentum-wd": {"momentum": 0.9, "weight_decay": 0.01},
    "nesterov-clip": {"momentum": 0.5, "nesterov": True, "clip_norm": 0.5},
}


@pytest.mark.parametrize("case", TRAIN_CASES, ids=list(TRAIN_CASES))
@pytest.mark.parametrize("net,shape", [("mlp", (6,)), ("cnn2d", (1, 8, 8))], ids=["mlp", "cnn2d"])
def test_each_client_ends_where_the_sequential_loop_ends(case, net, shape):
    cfg = TrainConfig(batch_size=8, lr=0.1, **TRAIN_CASES[case])
    model, data = _model(net, shape), _clients(shape)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = _sequential(model, start, data, cfg)
    stacked = stack([start] * len(data))
    means = batched_local_training(model, stacked, data, _generators(), cfg, cfg.lr, epochs=EPOCHS)
    for i, (params, loss) in enumerate(expected):
        _assert_close(stacked, i, params)
        assert means[i]["train_loss"] == pytest.approx(loss, rel=1e-5)
        assert not torch.equal(stacked["head.fc3.weight"][i], start["head.fc3.weight"])  # it did train


def test_proximal_term_and_a_trainable_subset_match_the_sequential_loop():
    cfg = TrainConfig(batch_size=8, lr=0.1, momentum=0.9)
    model, data = _model("mlp", (6,)), _clients((6,))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.reshape(-1) for p in start.values()])
    anchors = [flat + 0.3 * i for i in range(len(data))]  # each client its own anchor and coefficient
    mus = [0.2 + 0.3 * i for i in range(len(data))]
    expected = _sequential(model, start, data, cfg, anchors=anchors, mus=mus)
    stacked = stack([start] * len(data))
    params = list(model.parameters())
    terms = [ProximalTerm(params, names, a, mu) for a, mu in zip(anchors, mus, strict=True)]
    means = batched_local_training(
        model, stacked, data, _generators(), cfg, cfg.lr, epochs=EPOCHS, regulariser=ProximalTerm.stacked(terms)
    )
    for i, (p, loss) in enumerate(expected):
        _assert_close(stacked, i, p)
        assert means[i]["train_loss"] == pytest.approx(loss, rel=1e-5)

    head = ["head.fc3.weight", "head.fc3.bias"]  # only the head trains: the base stays as it was
    stacked = stack([start] * len(data))
    batched_local_training(model, stacked, data, _generators(), cfg, cfg.lr, trainable=head)
    for i in range(len(data)):
        assert torch.equal(stacked["base.fc1.weight"][i], start["base.fc1.weight"])
        assert not torch.equal(stacked["head.fc3.weight"][i], start["head.fc3.weight"])


@pytest.mark.parametrize("options", [{}, {"momentum": 0.9, "clip_norm": 1.0}], ids=["stepping-gemm", "momentum-clip"])
def test_a_clients_result_does_not_depend_on_its_block(options):
    """Bit for bit: alone, in a block of 3 or of 5, at any position (placement cannot change results)."""
    cfg = TrainConfig(batch_size=8, lr=0.1, **options)
    model, data = _model("mlp", (6,)), _clients((6,))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    def train(members: list[int]) -> dict[int, dict[str, torch.Tensor]]:
        stacked = stack([start] * len(members))
        gens = _generators()
        batched_local_training(
            model, stacked, [data[i] for i in members], [gens[i] for i in members], cfg, cfg.lr,
            epochs=[EPOCHS[i] for i in members],
        )  # fmt: skip
        return {i: {n: t[j] for n, t in stacked.items()} for j, i in enumerate(members)}

    together = train([0, 1, 2, 3, 4])
    for members in ([2], [4, 2, 0], [3, 1, 2, 0, 4]):
        for i, params in train(members).items():
            for n, p in params.items():
                assert torch.equal(p, together[i][n]), (members, i, n)


def test_batches_are_the_sequential_loops_permutations_with_exact_padding():
    gens = _generators()
    plan = plan_batches(SIZES, 8, EPOCHS, gens, torch.float32)
    offsets = torch.tensor([0, *SIZES[:-1]]).cumsum(0)
    for i, n in enumerate(SIZES):
        expected = [idx for _, idx in epoch_batches(n, 8, EPOCHS[i], _generators()[i], torch.device("cpu"))]
        rows = [plan.index[s, i, : int(plan.size[s, i])] - offsets[i] for s in range(plan.steps[i])]
        assert len(rows) == len(expected)
        for got, want in zip(rows, expected, strict=True):  # the sequential loop's batches, one by one
            assert torch.equal(got, want)
        assert plan.steps[i] == EPOCHS[i] * -(-n // 8)
        assert float(plan.mask[: plan.steps[i], i].sum()) == EPOCHS[i] * n  # only real rows weigh
        assert float(plan.mask[plan.steps[i] :, i].sum()) == 0  # a finished client weighs nothing


def test_auto_fits_the_memory_budget():
    model = _model("mlp", (6,))
    sample = torch.randn(1, 6)
    per_client = client_bytes(model, TrainConfig(), sample, 64)
    for mb in (0.05, 0.2, 1.0):
        cfg = TrainConfig(client_batch={"memory_mb": mb})
        k = choose_client_batch(cfg, model, torch.device("cpu"), sample, 64)
        budget = mb * 2**20
        assert k == 1 or k * per_client <= budget  # never above the budget (1 when one client is already more)
        assert (k + 1) * per_client > budget  # and the most that fit
    assert choose_client_batch(TrainConfig(client_batch=7), model, torch.device("cpu"), sample, 64) == 7
    assert choose_client_batch(TrainConfig(client_batch="auto"), model, torch.device("cpu"), sample, 64) > 1


def test_ranks_sharing_a_gpu_split_its_auto_budget(monkeypatch):
    """On a GPU, auto's budget is GPU_FRACTION of the device's memory divided among the ranks bound to it (the
    node's ranks over its GPUs, rounded up); a CPU and an explicit memory_mb are not divided."""
    from types import SimpleNamespace

    from pfl_mpi.runtime.device import ranks_per_device
    from pfl_mpi.training.client_batch import GPU_FRACTION, budget_bytes

    memory = 8 * 2**30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=memory))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert [ranks_per_device(gpu, n) for n in (1, 2, 3, 5)] == [1, 1, 2, 3]
    assert ranks_per_device(cpu, 5) == 1
    auto = TrainConfig(client_batch="auto")
    assert budget_bytes(auto, gpu) == int(GPU_FRACTION * memory)
    assert budget_bytes(auto, gpu, sharing=3) == int(GPU_FRACTION * memory) // 3
    assert budget_bytes(auto, cpu, sharing=3) == budget_bytes(auto, cpu)
    fixed = TrainConfig(client_batch={"memory_mb": 10})
    assert budget_bytes(fixed, gpu, sharing=3) == 10 * 2**20


def _peak_bytes(run) -> int:
    """The peak of torch's CPU allocations while ``run()`` runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    held = peak = 0
    for event in events:
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("net,shape", [("mlp", (6,)), ("cnn2d", (1, 8, 8))], ids=["mlp", "cnn2d"])
@pytest.mark.parametrize("options", [{}, {"momentum": 0.9, "clip_norm": 1.0}], ids=["plain", "momentum-clip"])
def test_a_block_that_auto_chose_stays_within_the_budget(net, shape, options):
    """Measured: what a block of the K that auto chose allocates (its stacks, data copy, batch plan, activations,
    gradients and buffers) peaks below the budget, and below K times the per-client estimate."""
    model, data = _model(net, shape), _clients(shape)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for mb in (0.1, 0.4, 3.0):
        cfg = TrainConfig(batch_size=8, client_batch={"memory_mb": mb}, **options)
        k = choose_client_batch(cfg, model, torch.device("cpu"), data[0][0][:1], max(SIZES))
        block = [data[i % len(data)] for i in range(k)]
        gens = [torch.Generator().manual_seed(i) for i in range(k)]
        peak = _peak_bytes(partial(batched_local_training, model, stack([start] * k), block, gens, cfg, cfg.lr))
        peak += k * sum(p.numel() * p.element_size() for p in start.values())  # the stacks, made before
        assert peak <= k * client_bytes(model, cfg, data[0][0][:1], max(SIZES))
        assert k == 1 or peak <= mb * 2**20, (k, peak)


@pytest.mark.parametrize("value", ["0", "-2", "many", "{memory_mb: -1}", "{memory_mb: 0}", "{mem: 3}", "true", "2.5"])
def test_a_bad_client_batch_is_refused_naming_the_key_and_its_forms(value):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"train.client_batch={value}"])
    assert info.value.key == "train.client_batch"
    assert info.value.message.startswith("must be auto, {memory_mb: M} with M > 0, or an integer >= 1; got ")
