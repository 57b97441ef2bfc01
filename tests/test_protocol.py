"""The protocol ledger: what each client would download and upload in a deployment, independent of the ranks."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from pfl_mpi.runtime import Engine
from pfl_mpi.wire import WIRE_DTYPES, Broadcast, Gathered, PerClient, WeightedSum

from .helpers import RecordingWorld, tiny_config
from .test_contract import BUILT_IN, _cfg

TABLES = ("protocol_bytes_down", "protocol_bytes_up", "protocol_eval_bytes_down")


def _read(path, group: str, names) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: f[group][name][()] for name in names}


@pytest.mark.parametrize("algorithm", BUILT_IN)
def test_protocol_bytes_are_the_payloads_the_transport_moved_per_client(tmp_path, algorithm):
    """On one process every payload passes through the transport once: the per-client protocol bytes of a round
    add up to the bytes of its down/up messages (a Broadcast and a WeightedSum term once per client)."""
    world = RecordingWorld()
    cfg = _cfg(algorithm, tmp_path / "run.h5", 2)
    engine = Engine(cfg, world, show_progress=False)
    assert engine.run() == 0
    algo = engine.algo
    clients = _read(cfg.output_path, "clients", (*TABLES, "participated"))
    rounds = _read(cfg.output_path, "rounds", ("protocol_bytes_down", "protocol_bytes_up", "protocol_bytes_eval"))
    calls = {label: [c for c in world.calls if c[1] == label] for label in ("down", "up", "eval_down")}
    for t in range(2):
        trained = clients["participated"][t].astype(bool)
        down, up = clients["protocol_bytes_down"][t], clients["protocol_bytes_up"][t]
        assert down.dtype == np.int64 and not down[~trained].any() and not up[~trained].any()
        assert rounds["protocol_bytes_down"][t] == down.sum() and rounds["protocol_bytes_up"][t] == up.sum()
        if isinstance(algo.down, Broadcast):
            assert set(down[trained]) == {calls["down"][t][3]}
        elif isinstance(algo.down, PerClient):
            assert down.sum() == calls["down"][t][3]
        else:
            assert not down.any() and not calls["down"]
        if isinstance(algo.up, WeightedSum):  # float32: the summed weight rides in one more slot
            moved = calls["up"][2 * t if algo.up.dtype != torch.float32 else t][3]
            extra = 4 if algo.up.dtype == torch.float32 else 0
            share = [algo.up_numel_of(k) / algo.up_numel() for k in np.flatnonzero(trained)]  # FedProto: a group slot
            assert list(up[trained]) == [round((moved - extra) * part) for part in share]
        elif isinstance(algo.up, Gathered):
            assert up.sum() == calls["up"][t][3]
        else:
            assert not up.any() and not calls["up"]
        evaluation = clients["protocol_eval_bytes_down"][t]  # every round is an evaluation round here
        assert rounds["protocol_bytes_eval"][t] == evaluation.sum()
        if isinstance(algo.eval_down, Broadcast):
            assert set(evaluation) == {calls["eval_down"][t][3]}
        elif isinstance(algo.eval_down, PerClient):
            assert evaluation.sum() == calls["eval_down"][t][3]
        else:
            assert not evaluation.any() and not calls["eval_down"]


def test_fedavg_moves_the_model_each_way_per_client(tmp_path):
    cfg = tiny_config(tmp_path / "fedavg.h5", "fedavg", rounds=1)
    engine = Engine(cfg, RecordingWorld(), show_progress=False)
    assert engine.run() == 0
    d = sum(p.numel() for p in engine.algo.setup.model.parameters())
    clients = _read(cfg.output_path, "clients", (*TABLES, "participated"))
    trained = clients["participated"][0].astype(bool)
    assert trained.sum() == 6
    assert set(clients["protocol_bytes_down"][0][trained]) == {4 * d}
    assert set(clients["protocol_bytes_up"][0][trained]) == {4 * d}
    assert set(clients["protocol_eval_bytes_down"][0]) == {4 * d}  # every client is evaluated with w


def test_topk_uploads_its_bit_packed_indices_and_values(tmp_path):
    cfg = tiny_config(tmp_path / "topk.h5", "topk", rounds=1, **{"algorithm.k": 50})
    engine = Engine(cfg, RecordingWorld(), show_progress=False)
    assert engine.run() == 0
    d = engine.algo.shared.numel
    bits = int(np.ceil(np.log2(d)))  # per index, then k float32 values
    expected = int(np.ceil(50 * bits / 8)) + 50 * 4
    assert engine.algo.up_numel() * WIRE_DTYPES[engine.algo.up.dtype].itemsize == expected
    clients = _read(cfg.output_path, "clients", ("protocol_bytes_up", "participated"))
    assert set(clients["protocol_bytes_up"][0][clients["participated"][0].astype(bool)]) == {expected}


def test_protocol_bytes_and_topk_saving_are_the_same_on_1_and_3_ranks(tmp_path):
    """The same config through the CLI on one process and on 3 ranks (2 workers): the transport bytes differ, the
    protocol's do not, so top-k's saving over FedAvg is one ratio on every rank count (tests/mpi checks every
    config on 2 and 4 ranks against one process, client by client)."""
    totals = {}
    for algorithm in ("fedavg", "topk"):
        for ranks in (1, 3):
            out = tmp_path / f"{algorithm}-{ranks}.h5"
            sets = {"algorithm.name": algorithm, "data.num_clients": 10, "clients_per_round": 6, "rounds": 3}
            sets |= {"model.name": "mlp", "model.hidden": "[16]", "train.batch_size": 8}
            args = [sys.executable, "-m", "pfl_mpi", "run", "-n", str(ranks), "--quiet", "--out", str(out)]
            for key, value in sets.items():
                args += ["--set", f"{key}={value}"]
            done = subprocess.run(args, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
            totals[algorithm, ranks] = _read(out, "rounds", ("protocol_bytes_down", "protocol_bytes_up", "bytes_up"))
        for name in ("protocol_bytes_down", "protocol_bytes_up"):
            np.testing.assert_array_equal(totals[algorithm, 3][name], totals[algorithm, 1][name], err_msg=name)
        assert totals[algorithm, 1]["protocol_bytes_up"].sum() > 0  # one process still pays the protocol
        assert not totals[algorithm, 1]["bytes_up"].any()  # ... but moves nothing over MPI
    saving = {
        p: totals["fedavg", p]["protocol_bytes_up"].sum() / totals["topk", p]["protocol_bytes_up"].sum() for p in (1, 3)
    }
    assert saving[1] == saving[3] > 1
    transport = totals["fedavg", 3]["bytes_up"].sum() / totals["topk", 3]["bytes_up"].sum()
    assert transport < saving[3]  # the transport's ratio reads a different saving: one Reduce per worker rank


def test_info_and_the_progress_line_lead_with_the_protocol_bytes(tmp_path, capsys):
    from pfl_mpi.cli import main

    cfg = tiny_config(tmp_path / "fedavg.h5", "fedavg", rounds=2)
    assert Engine(cfg, RecordingWorld(), show_progress=False).run() == 0
    rounds = _read(cfg.output_path, "rounds", ("protocol_bytes_down", "protocol_bytes_up", "protocol_bytes_eval"))
    assert main(["info", str(cfg.output_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    protocol = next(i for i, line in enumerate(lines) if "protocol bytes" in line)
    transport = next(i for i, line in enumerate(lines) if "transport bytes" in line)
    assert protocol < transport
    expected = (f"{rounds[k].sum():.3e}" for k in ("protocol_bytes_down", "protocol_bytes_up", "protocol_bytes_eval"))
    assert lines[protocol].endswith("down {}, up {}, evaluation {}".format(*expected))
