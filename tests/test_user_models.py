"""Your own nn.Module (tests/plugins/user_models.py): factory and registered names, options, the declared head,
the buffers policy, one-line refusals before MPI, and the networks exported as state_dicts."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.data import load_federated
from pfl_mpi.models import build_models, split_names
from pfl_mpi.models.registry import registered
from pfl_mpi.report.models import export_models
from pfl_mpi.runtime import Engine
from pfl_mpi.runtime.build import build_algorithm
from pfl_mpi.store import read_client_states
from pfl_mpi.training.loop import evaluate

from .helpers import committed, kill_tree, tiny_config

PLUGIN = Path(__file__).parent / "plugins" / "user_models.py"
GN = "user_models:resnet_gn"
USER = {"plugins": f"[{PLUGIN}]", "model.name": GN, "rounds": 2, "clients_per_round": 4}

YAML = f"""\
name: user
rounds: 1
clients_per_round: 2
device: cpu
plugins: [{PLUGIN}]
data:
  name: digits
  num_clients: 6
model:
  name: {GN}
algorithm:
  name: fedavg
"""


@pytest.mark.parametrize(
    "sets,key,words",
    [
        (["model.depth=3"], "model.depth", "takes width, blocks, groups"),
        (["model.width=wide"], "model.width", "integer"),
        (["model.name=no_such_net"], "model.name", "unknown network 'no_such_net'"),
        (["model.name=no_such_module:f"], "model.name", "cannot import 'no_such_module'"),
        (["model.name=user_models:not_a_module"], "model.name", "not a torch.nn.Module"),
        (["model.name=mlp", "model.width=3"], "model.width", "Extra inputs"),
        (["model.name=mlp", "model.head=[fc]"], "model.head", "head_layers"),
        (["model.head=[]"], "model.head", "at least 1"),
        (["algorithm.name=fedper"], "model.head", "declares no head"),
        (["algorithm.name=fedper", "model.head=[fcc]"], "model.head", "'fcc' selects no parameter"),
        (["algorithm.name=lgfedavg"], "model.head", "declares no head"),
        (["model.name=wrong_head"], "model.head", "'classifier' selects no parameter of WrongHead"),
        (["model.buffers=always"], "model.buffers", "shared"),
        (["model.name=tiny_resnet_bn", "model.buffers=refuse"], "model.buffers", "9 buffers"),
        (["model.name=tiny_resnet_bn", "algorithm.name=fedrep"], "model.buffers", "fedrep does not handle"),
        (["model.name=tiny_resnet_bn", "algorithm.name=fedprox"], "model.buffers", "fedprox does not handle"),
        (["algorithm.name=fedproto"], "model.name", "base and head modules"),
        (["algorithm.name=fedgen"], "model.name", "base and head modules"),
        (["model.architectures=[{}, {name: mlp, width: 3}]"], "model.architectures.1.width", "Extra inputs"),
        (
            ["algorithm.name=fedproto", "model.architectures=[{}, {name: tiny_resnet_gn, depth: 3}]"],
            "model.architectures.1.depth",
            "unknown key",
        ),
    ],
)
def test_bad_model_keys_exit_2_with_one_line(tmp_path, monkeypatch, capsys, sets, key, words):
    from pfl_mpi.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "user.yaml").write_text(YAML, encoding="utf-8")
    args = ["run", "user.yaml"] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"pfl-mpi: config error: {key}: "), lines
    assert words in lines[0]
    assert not (tmp_path / "runs").exists()


def _built(tmp_path, algorithm, **sets):
    cfg = tiny_config(tmp_path / "x.h5", algorithm, **{**USER, **sets})
    data = load_federated(cfg.data, cfg.seed)
    return cfg, data, build_algorithm(cfg, data)


def test_factory_gets_the_data_shape_classes_and_options(tmp_path):
    cfg, data, algo = _built(tmp_path, "fedavg", **{"model.width": 6, "model.blocks": 2})
    model = algo.setup.model
    assert type(model).__name__ == "TinyResNet" and model.shape == tuple(data.input_shape) == (1, 8, 8)
    assert model.stem.out_channels == 6 and len(model.blocks) == 2 and model.fc.out_features == data.num_classes
    torch.manual_seed(cfg.seed)  # initialised under the run seed, like a built-in network
    by_hand = registered("tiny_resnet_gn")(data.input_shape, data.num_classes, width=6, blocks=2)
    for (n, p), (m, q) in zip(model.named_parameters(), by_hand.named_parameters(), strict=True):
        assert n == m and torch.equal(p, q)


def test_the_declared_head_splits_fedper_and_lgfedavg(tmp_path):
    _, _, fedper = _built(tmp_path, "fedper", **{"model.head": "[fc]"})
    assert fedper.shared.personal_layout.names == ("fc.weight", "fc.bias")
    assert "fc.weight" not in fedper.shared.names and "stem.weight" in fedper.shared.names
    _, _, lg = _built(tmp_path, "lgfedavg", **{"model.head": "[fc, blocks.0.norm2]"})
    assert lg.shared.names == ("blocks.0.norm2.weight", "blocks.0.norm2.bias", "fc.weight", "fc.bias")
    _, _, method = _built(tmp_path, "fedper", **{"model.name": "tiny_resnet_bn"})  # head_prefixes() -> [fc]
    assert method.shared.personal_layout.names == ("fc.weight", "fc.bias")


def test_builtin_networks_keep_their_split_and_layout(tmp_path):
    cfg = tiny_config(tmp_path / "x.h5", "fedper", **{"model.hidden": "[16, 8]", "model.head_layers": 2})
    model = build_models(cfg.model, (8, 8), 10, cfg.seed)[0]
    names = [n for n, _ in model.named_parameters()]
    shared, own = split_names(model, lambda n: n.startswith("head."))
    assert own == [n for n in names if n.startswith("head.")] and shared + own == sorted(names, key=names.index)
    assert own == ["head.fc2.weight", "head.fc2.bias", "head.fc3.weight", "head.fc3.bias"]


def test_buffers_shared_follow_the_split_personal_are_client_state(tmp_path):
    bn = {"model.name": "tiny_resnet_bn"}
    _, _, avg = _built(tmp_path, "fedavg", **bn)
    buffers = [n for n, _ in avg.setup.model.named_buffers()]
    assert len(buffers) == 9 and avg.shared.names[-9:] == tuple(buffers) and not avg.shared.has_personal
    model = avg.setup.model
    assert avg.down_numel() == sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    _, _, fedbn = _built(tmp_path, "fedavg", **bn, **{"model.buffers": "personal"})
    assert fedbn.shared.personal_layout.names == tuple(buffers)
    assert fedbn.client_state_spec(0) == {"personal": sum(b.numel() for _, b in fedbn.setup.model.named_buffers())}


def _run(cfg) -> Path:
    assert Engine(cfg, SerialWorld(), show_progress=False).run() == 0
    return cfg.output_path


def test_fedbn_rule_keeps_each_clients_statistics(tmp_path):
    sets = {**USER, "model.name": "tiny_resnet_bn", "model.buffers": "personal", "state_every": 1}
    path = _run(tiny_config(tmp_path / "fedbn.h5", "fedavg", **sets))
    with h5py.File(path) as f:
        personal = f["clients/state/personal"][-1]
        trained = f["clients/participated"][...].any(axis=0)
        width = f["global/state/shared"].shape[1]
    cfg, data, algo = _built(tmp_path, "fedavg", **sets)
    start = algo.shared.initial_personal.numpy()
    assert width == algo.shared.numel  # no buffer travels
    for k in range(len(personal)):  # a client's statistics change only when it trains, and differ between clients
        assert np.array_equal(personal[k], start) != bool(trained[k])
    moved = personal[trained]
    assert len({row.tobytes() for row in moved}) == len(moved)


@pytest.mark.parametrize(
    "algorithm,sets",
    [
        ("fedavg", {"model.name": "tiny_resnet_bn"}),
        ("fedper", {"model.head": "[fc]"}),
        ("lgfedavg", {"model.name": "tiny_resnet_bn"}),
        ("ditto", {}),
        ("local", {}),
        ("pfedhn", {}),
        ("pfedhn-pc", {"model.head": "[fc]"}),
    ],
)
def test_exported_networks_reproduce_the_recorded_accuracy(tmp_path, algorithm, sets):
    from pfl_mpi.cli import main
    from pfl_mpi.report.models import load_network

    cfg = tiny_config(tmp_path / "run.h5", algorithm, **{**USER, **sets})
    path = _run(cfg)
    assert main(["export", str(path), "--model", str(tmp_path / "nets")]) == 0
    with h5py.File(path) as f:
        acc = f["clients/test_acc"][-1]
    data = load_federated(cfg.data, cfg.seed)
    files = sorted((tmp_path / "nets").glob("client_*.pt"))
    assert (tmp_path / "nets" / "global.pt").is_file() == (algorithm not in ("local", "pfedhn", "pfedhn-pc"))
    assert len(files) == (0 if algorithm == "fedavg" else data.num_clients)
    fresh = build_models(cfg.model, data.input_shape, data.num_classes, cfg.seed + 1)[0]  # other initial values
    for k in range(data.num_clients):
        state = tmp_path / "nets" / ("global.pt" if algorithm == "fedavg" else f"client_{k}.pt")
        fresh.load_state_dict(torch.load(state, weights_only=True))
        client = data.client(k)
        assert evaluate(fresh, client.x_test, client.y_test)[1] == acc[k]
    assert evaluate(load_network(path, state), client.x_test, client.y_test)[1] == acc[-1]


def test_user_and_builtin_networks_mix_as_architecture_groups(tmp_path):
    """FedProto over a user network with base/head modules and a built-in MLP: one state table per group, and
    each client's exported network is its own model from the last snapshot."""
    two = "[{name: tiny_split, width: 16}, {name: mlp, hidden: [16]}]"
    sets = {**USER, "model.name": "tiny_split", "model.architectures": two, "state_every": 1}
    cfg = tiny_config(tmp_path / "hetero.h5", "fedproto", **sets)
    path = _run(cfg)
    files, round = export_models(path, tmp_path / "nets")
    assert round == 1 and len(files) == cfg.data.num_clients
    data = load_federated(cfg.data, cfg.seed)
    nets = build_models(cfg.model, data.input_shape, data.num_classes, cfg.seed)
    assert [type(n).__name__ for n in nets] == ["SplitNet", "SplitModel"]
    states = read_client_states(path, "model")
    for k, flat in enumerate(states):
        net = nets[k % 2]
        net.load_state_dict(torch.load(tmp_path / "nets" / f"client_{k}.pt", weights_only=True))
        assert len(flat) == sum(p.numel() for p in net.parameters())
        assert np.array_equal(torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy(), flat)


def _wait_for_unlock(path: Path, limit: float = 60) -> None:
    import fcntl
    import time

    deadline = time.monotonic() + limit
    with open(path, "rb") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def test_fedbn_run_killed_mid_run_resumes_to_the_straight_result(tmp_path):
    """SIGKILL a 2-rank run of a BatchNorm network with per-client buffers (Adam, cosine schedule) after two
    rounds, resume it in one process: the rounds and every client's statistics equal a straight run's."""
    import os
    import subprocess
    import sys
    import time

    from pfl_mpi.config import load_config

    cfg_file = tmp_path / "fedbn.yaml"
    cfg_file.write_text(
        YAML.replace("name: user\n", "name: fedbn\nstate_every: 1\n").replace(
            f"  name: {GN}\n", "  name: tiny_resnet_bn\n  buffers: personal\n"
        )
        + "train:\n  optimizer: adam\n  lr: 0.01\n  batch_size: 16\n"
        + "  schedule: {name: cosine, period: 20, min_factor: 0.1}\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_", "MPI_", "HYDRA"))}
    broken = tmp_path / "broken.h5"
    run = [sys.executable, "-m", "pfl_mpi", "run", str(cfg_file), "--quiet"]
    proc = subprocess.Popen(
        [*run, "-n", "2", "--out", str(broken), "--set", "rounds=1000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        done = 0
        while done < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            try:
                with h5py.File(broken, "r", locking=False) as f:
                    done = int(f.attrs["rounds_completed"])
            except (OSError, KeyError):
                pass
    finally:
        kill_tree(proc.pid)
        proc.wait()
    _wait_for_unlock(broken)  # the killed ranks are gone once nobody holds the file's lock
    with h5py.File(broken, "r", locking=False) as f:
        done = int(f.attrs["rounds_completed"])
    assert 2 <= done < 1000
    rounds = done + 3  # the kill may land after one more round's commit
    resumed = load_config(cfg_file, [f"rounds={rounds}", f"output={broken}"])  # here, on one process
    engine = Engine(resumed, SerialWorld(), resume=True, show_progress=False)
    assert 2 <= engine.start_round < rounds and engine.run() == 0
    straight = load_config(cfg_file, [f"rounds={rounds}", f"output={tmp_path / 'straight.h5'}"])
    _run(straight)
    for name in ("train_loss", "test_acc"):
        a, b = committed(broken, "rounds", name), committed(straight.output_path, "rounds", name)
        assert len(a) == len(b) == rounds
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
    with h5py.File(broken) as f, h5py.File(straight.output_path) as g:
        assert f.attrs["status"] == "completed"
        np.testing.assert_allclose(f["clients/state/personal"][-1], g["clients/state/personal"][-1], atol=1e-5)
        np.testing.assert_allclose(f["global/state/shared"][-1], g["global/state/shared"][-1], atol=1e-5)
