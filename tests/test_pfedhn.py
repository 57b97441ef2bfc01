"""pFedHN, pFedHN-PC: phi never moves, the server step is the chain rule, PC heads stay home, resume, novel clients."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from pfl_mpi.algorithms import Client, Collected, Setup, resolve
from pfl_mpi.algorithms.novel_clients import learn_novel_embedding
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.data import load_federated
from pfl_mpi.models import build_model
from pfl_mpi.runtime import Engine
from pfl_mpi.seeding import client_generator
from pfl_mpi.store import read_comm
from pfl_mpi.store.nested import flatten_state, unflatten_state
from pfl_mpi.training.loop import evaluate

from .helpers import RecordingWorld, committed, tiny_config

FAST = {"algorithm.inner_steps": 5}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """One torch thread, as the engine pins (tiny tensors); the rest of the session gets its own back."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _algorithm(tmp_path, name="pfedhn", **overrides):
    """(cfg, data, algorithm) built as every rank builds them, with the server initialised."""
    cfg = tiny_config(tmp_path / "run.h5", name, **overrides)
    data = load_federated(cfg.data, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    cls, params = resolve(cfg.algorithm)
    algo = cls(params, Setup(model, torch.device("cpu"), cfg.train, data.num_clients, data.num_classes, cfg.seed))
    algo.init_server()
    return cfg, data, algo


def _client(cfg, data, algo, k: int, t: int, state=None) -> Client:
    state = algo.init_client_state(k) if state is None else state
    return Client(k, t, data.client(k), state, client_generator(cfg.seed, k, t))


def _target_numel(model: torch.nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


@pytest.mark.parametrize("name,prefix", [("pfedhn", ""), ("pfedhn-pc", "base.")])
def test_only_generated_parameters_move_never_phi(tmp_path, name, prefix):
    cfg = tiny_config(tmp_path / "run.h5", name, rounds=2, clients_per_round=4, **FAST)
    world = RecordingWorld()
    engine = Engine(cfg, world, show_progress=False)
    assert engine.run() == 0
    algo, model = engine.algo, engine.algo.setup.model
    numel = _target_numel(model, prefix)  # pFedHN: the whole target network; PC: its base only
    assert algo.down_numel() == algo.up_numel() == numel
    phi_numel = sum(p.numel() for p in algo.hnet.parameters())
    assert phi_numel > 8 * numel  # one head of hidden_dim x numel, plus biases, MLP and embeddings

    by_label: dict[str, list[int]] = {}
    for label, nbytes in world.moved:
        by_label.setdefault(label, []).append(nbytes)
    assert by_label["down"] == [4 * numel * 4] * 2  # Scatterv: float32 theta_i of the 4 sampled clients
    assert by_label["up"] == [4 * numel * 4] * 2  # Gatherv: their theta_i - theta_i~
    assert by_label["eval_down"] == [4 * numel * 10] * 2  # theta_i of every client, for evaluation
    assert max(nbytes for _, nbytes in world.moved) < 4 * phi_numel / 2  # phi (or half of it) never moves
    with h5py.File(cfg.output_path) as f:
        assert f["global/state/phi"].shape[1] == phi_numel
        assert set(f["clients/state"]) == ({"round", "head", "head_momentum"} if prefix else {"round"})


def test_mpi_run_records_4_bytes_per_parameter_per_client(tmp_path):
    """A real 2-rank run: /rounds/bytes_down and bytes_up are 4 * numel * sampled clients, eval_down 4 * numel * N."""
    out = tmp_path / "mpi.h5"
    sets = {"rounds": 2, "clients_per_round": 3, "data.num_clients": 10, "model.hidden": "[16]", **FAST}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_", "MPI_", "HYDRA"))}
    cmd = [sys.executable, "-m", "pfl_mpi", "run", "-n", "2", "--quiet", "--out", str(out)]
    cmd += ["--set", "algorithm.name=pfedhn-pc", "--set", "data.partition=shards", *args]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    base = 64 * 16 + 16  # digits 8 x 8 -> mlp [16]: the base (fc1); the head fc2 stays on the clients
    assert committed(out, "rounds", "bytes_down").tolist() == [4 * base * 3] * 2
    assert committed(out, "rounds", "bytes_up").tolist() == [4 * base * 3] * 2
    labels, comm = read_comm(out)
    eval_down = comm["bytes_received"][:, 1, labels.index("eval_down")]  # rank 1 hosts every client
    assert eval_down.tolist() == [4 * base * 10] * 2


def _independent_local_steps(cfg, data, theta: torch.Tensor, k: int, t: int) -> torch.Tensor:
    """K steps of torch.optim.SGD (momentum, weight decay) with clip_grad_norm_ on random minibatches."""
    p = resolve(cfg.algorithm)[1]
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    params = list(model.parameters())
    torch.nn.utils.vector_to_parameters(theta.clone(), params)  # it aliases the vector it is given
    opt = torch.optim.SGD(params, lr=p.inner_lr, momentum=p.inner_momentum, weight_decay=p.inner_weight_decay)
    x, y = data.client(k).x_train, data.client(k).y_train
    generator = client_generator(cfg.seed, k, t)
    for _ in range(p.inner_steps):
        idx = torch.randperm(len(y), generator=generator)[: cfg.train.batch_size]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        torch.nn.utils.clip_grad_norm_(params, p.inner_grad_clip)
        opt.step()
    return torch.nn.utils.parameters_to_vector(params).detach()


def test_client_sends_theta_minus_its_k_local_steps(tmp_path):
    overrides = {"algorithm.inner_steps": 7, "algorithm.inner_lr": 0.05, "algorithm.inner_grad_clip": 0.3}
    cfg, data, algo = _algorithm(tmp_path, **overrides)
    theta = algo.downlink(0, [3, 6], "train")
    for i, k in enumerate([3, 6]):
        update = algo.client_update(_client(cfg, data, algo, k, 0), theta[i])
        expected = theta[i] - _independent_local_steps(cfg, data, theta[i], k, 0)
        torch.testing.assert_close(update.payload, expected, rtol=0, atol=1e-6)
        assert update.payload.norm() > 0


def _authors_pc_rounds(cfg, data, theta: torch.Tensor, k: int, rounds: int, shared: bool):
    """The authors' pFedHN-PC client, with torch.optim: per round, a fresh SGD on the generated base whose gradient
    is clipped, and the head's own SGD, created once and kept across rounds, unclipped (``shared``: one clipped SGD
    on both, fresh every round). Returns the base after each round (each starting from ``theta``), the head and
    the head optimiser's momentum buffers (flat)."""
    p = resolve(cfg.algorithm)[1]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    base = [q for n, q in model.named_parameters() if n.startswith("base.")]
    head = [q for n, q in model.named_parameters() if n.startswith("head.")]
    sgd = {"lr": p.inner_lr, "momentum": p.inner_momentum, "weight_decay": p.inner_weight_decay}
    head_opt = torch.optim.SGD(head, **sgd)
    x, y = data.client(k).x_train, data.client(k).y_train
    bases = []
    for t in range(rounds):
        torch.nn.utils.vector_to_parameters(theta.clone(), base)
        opt = torch.optim.SGD(base + head if shared else base, **sgd)
        generator = client_generator(cfg.seed, k, t)
        for _ in range(p.inner_steps):
            idx = torch.randperm(len(y), generator=generator)[: cfg.train.batch_size]
            opt.zero_grad()
            head_opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            torch.nn.utils.clip_grad_norm_(base + head if shared else base, p.inner_grad_clip)
            opt.step()
            if not shared:
                head_opt.step()
        bases.append(torch.nn.utils.parameters_to_vector(base).detach())
    buffers = [head_opt.state[q]["momentum_buffer"].reshape(-1) for q in head if q in head_opt.state]
    return bases, torch.nn.utils.parameters_to_vector(head).detach(), torch.cat(buffers) if buffers else None


@pytest.mark.parametrize("head_optimizer", ["own", "shared"])
def test_pc_head_trains_with_its_own_kept_optimiser_and_only_the_base_is_clipped(tmp_path, head_optimizer):
    """Three rounds of one client from the same theta against the authors' loop: with ``own`` the head's momentum
    carries over between rounds (client state) and its gradient is never clipped; ``shared`` is one clipped SGD."""
    overrides = {"algorithm.inner_steps": 6, "algorithm.inner_lr": 0.05, "algorithm.inner_grad_clip": 0.2}
    cfg, data, algo = _algorithm(tmp_path, "pfedhn-pc", **overrides, **{"algorithm.head_optimizer": head_optimizer})
    k, rounds = 3, 3
    (theta,) = algo.downlink(0, [k], "train")
    state = algo.init_client_state(k)
    updates = [algo.client_update(_client(cfg, data, algo, k, t, state), theta.clone()).payload for t in range(rounds)]
    bases, head, momentum = _authors_pc_rounds(cfg, data, theta, k, rounds, shared=head_optimizer == "shared")
    for update, base in zip(updates, bases, strict=True):
        torch.testing.assert_close(update, theta - base, rtol=0, atol=1e-6)
    torch.testing.assert_close(state["head"], head, rtol=0, atol=1e-6)
    assert ("head_momentum" in state) == (head_optimizer == "own")
    if head_optimizer == "own":  # the kept momentum is the head's torch.optim buffer, and it is not zero
        torch.testing.assert_close(state["head_momentum"], momentum, rtol=0, atol=1e-6)
        assert momentum.abs().sum() > 0
    other, _, _ = _authors_pc_rounds(cfg, data, theta, k, rounds, shared=head_optimizer != "shared")
    assert (other[-1] - bases[-1]).abs().max() > 1e-4  # the two rules differ on this client


@pytest.mark.parametrize("grad_clip", [50.0, 1e-3], ids=["unclipped", "clipped"])
def test_server_step_is_the_chain_rule_then_clip_and_sgd(tmp_path, grad_clip):
    overrides = {"model.hidden": "[4]", "algorithm.embedding_dim": 3, "algorithm.hidden_dim": 5}
    cfg, data, algo = _algorithm(tmp_path, **overrides, **{"algorithm.n_hidden": 1, "algorithm.grad_clip": grad_clip})
    p = algo.params
    ref = copy.deepcopy(algo.hnet)
    names = [n for n, _ in ref.named_parameters()]
    opt = torch.optim.SGD(ref.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    noise = torch.Generator().manual_seed(0)
    for t, clients in enumerate([[1, 4, 7], [0, 4]]):
        theta = algo.downlink(t, clients, "train")
        delta = torch.randn(theta.shape, generator=noise)
        metrics = algo.aggregate(t, Collected(clients, delta, torch.ones(len(clients))))

        phi = tuple(q.detach().clone() for q in ref.parameters())
        grads = [torch.zeros_like(q) for q in phi]
        for i, k in enumerate(clients):

            def theta_of(*values, k=k):
                return functional_call(ref, dict(zip(names, values, strict=True)), (torch.tensor([k]),))[0]

            jacobians = torch.autograd.functional.jacobian(
                theta_of, phi, vectorize=True
            )  # each [numel(theta), *shape(phi part)]
            for g, jac in zip(grads, jacobians, strict=True):
                g += torch.tensordot(delta[i], jac, dims=1) / len(clients)  # J_i^T delta_i, averaged
        for q, g in zip(ref.parameters(), grads, strict=True):
            q.grad = g
        norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), grad_clip))
        opt.step()

        assert metrics["hn_grad_norm"] == pytest.approx(norm, rel=1e-5)
        assert (norm > grad_clip) == (grad_clip < 1)  # the clip acted exactly in the clipped case
        for name, a, b in zip(names, algo.hnet.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_evaluation_downlink_generates_every_client_without_a_graph(tmp_path):
    cfg, data, algo = _algorithm(tmp_path, **FAST)
    theta = algo.downlink(0, [2, 5], "train")
    algo.aggregate(0, Collected([2, 5], torch.ones_like(theta), torch.ones(2)))
    every = algo.downlink(0, list(range(10)), "eval")  # the evaluation of round 0, after its aggregate
    assert not every.requires_grad and every.shape == (10, algo.down_numel())
    with torch.no_grad():
        torch.testing.assert_close(every, algo.hnet(torch.arange(10)))
    assert not torch.allclose(every[2], theta[0])  # phi moved in between
    assert not torch.allclose(every[2], every[5])  # each client its own theta


def test_pc_heads_are_personal_and_used_with_the_generated_base(tmp_path):
    cfg = tiny_config(tmp_path / "pc.h5", "pfedhn-pc", rounds=3, clients_per_round=4, state_every=1, **FAST)
    engine = Engine(cfg, SerialWorld(), show_progress=False)
    assert engine.run() == 0
    algo, model = engine.algo, engine.algo.setup.model
    head_numel = _target_numel(model, "head.")
    assert algo.client_state_spec(0) == {"head": head_numel, "head_momentum": head_numel}
    initial = algo.init_client_state(0)["head"].numpy()
    with h5py.File(cfg.output_path) as f:
        heads = f["clients/state/head"][-1]
        participated = f["clients/participated"][:].any(axis=0).astype(bool)
        phi = torch.from_numpy(f["global/state/phi"][-1])
        test_acc = f["clients/test_acc"][-1]
    assert participated.sum() >= 3 and (~participated).any()
    trained = heads[participated]
    assert all(not np.allclose(trained[i], trained[j]) for i in range(len(trained)) for j in range(i))
    assert all(not np.allclose(h, initial) for h in trained)
    np.testing.assert_array_equal(heads[~participated], np.broadcast_to(initial, heads[~participated].shape))

    # a client's accuracy: the base generated from the snapshot of phi, with its own head
    _, data, fresh = _algorithm(tmp_path, "pfedhn-pc", **FAST)
    fresh.load_server_state({"phi": phi, "momentum": torch.zeros_like(phi)})
    with torch.no_grad():
        bases = fresh.hnet(torch.arange(10))
    for k in range(10):
        fresh.layout.load(fresh.setup.model, bases[k])
        fresh.personal_layout.load(fresh.setup.model, torch.from_numpy(heads[k]))
        acc = evaluate(fresh.setup.model, data.client(k).x_test, data.client(k).y_test)[1]
        assert acc == pytest.approx(test_acc[k], abs=1e-6)


def test_server_state_round_trips_exactly(tmp_path):
    cfg, data, algo = _algorithm(tmp_path, **FAST)
    for t in range(2):
        theta = algo.downlink(t, [t, 5], "train")
        updates = [algo.client_update(_client(cfg, data, algo, k, t), theta[i]).payload for i, k in enumerate([t, 5])]
        algo.aggregate(t, Collected([t, 5], torch.stack(updates), torch.ones(2)))
    state = unflatten_state(flatten_state(algo.server_state()))  # copies, as in the file
    assert set(state) == {"phi", "momentum"} and sum(float(b.abs().sum()) for b in state["momentum"].values()) > 0

    _, _, other = _algorithm(tmp_path / "other", **FAST, seed=7)  # another initialisation
    assert not torch.equal(other.server_state()["phi"], state["phi"])
    other.load_server_state(state)
    expected = flatten_state(state)
    for key, value in flatten_state(other.server_state()).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)
    delta = torch.randn(2, algo.up_numel(), generator=torch.Generator().manual_seed(1))
    for a in (algo, other):  # the next round continues identically
        a.downlink(2, [3, 8], "train")
        a.aggregate(2, Collected([3, 8], delta, torch.ones(2)))
    assert torch.equal(algo.server_state()["phi"], other.server_state()["phi"])


def test_resume_equals_a_straight_run(tmp_path):
    def run(name, rounds, resume=False):
        cfg = tiny_config(tmp_path / f"{name}.h5", "pfedhn-pc", rounds=rounds, clients_per_round=4, **FAST)
        assert Engine(cfg, SerialWorld(), resume=resume, show_progress=False).run() == 0
        return cfg.output_path

    straight = run("straight", 4)
    run("resumed", 2)
    resumed = run("resumed", 4, resume=True)
    for metric in ("train_loss", "test_acc", "test_loss", "hn_grad_norm"):
        np.testing.assert_allclose(
            committed(resumed, "rounds", metric), committed(straight, "rounds", metric), atol=1e-6
        )
    with h5py.File(straight) as a, h5py.File(resumed) as b:
        np.testing.assert_allclose(b["global/state/phi"][-1], a["global/state/phi"][-1], atol=1e-6)
        np.testing.assert_allclose(b["clients/state/head"][-1], a["clients/state/head"][-1], atol=1e-6)


def test_novel_client_learns_only_its_embedding(tmp_path):
    cfg, data, algo = _algorithm(
        tmp_path, **{"algorithm.lr": 0.05, "algorithm.inner_steps": 10, "algorithm.inner_lr": 0.05}
    )
    held_out, seen = 9, list(range(9))
    for t in range(12):  # federated training on clients 0..8 only
        clients = seen[(3 * t) % 9 : (3 * t) % 9 + 3]
        theta = algo.downlink(t, clients, "train")
        deltas = [algo.client_update(_client(cfg, data, algo, k, t), theta[i]).payload for i, k in enumerate(clients)]
        algo.aggregate(t, Collected(clients, torch.stack(deltas), torch.ones(len(clients))))
    phi = flatten_state(algo.server_state())  # copies

    frozen_v, frozen = learn_novel_embedding(algo, _client(cfg, data, algo, held_out, 100), steps=5, lr=0.0)
    v, losses = learn_novel_embedding(algo, _client(cfg, data, algo, held_out, 100), steps=15, lr=1.0)
    for key, value in flatten_state(algo.server_state()).items():
        np.testing.assert_array_equal(value, phi[key], err_msg=key)  # phi (embeddings too) and momentum untouched
    assert frozen == pytest.approx([frozen[0]] * 6)  # v fixed: the local steps alone change nothing
    assert v.shape == (algo.embedding_dim,) and not torch.equal(v, frozen_v)
    assert frozen[0] == losses[0] and losses[-1] < 0.7 * losses[0], losses
