"""Next-character training (task next_token) on a small generated play in LEAF's Shakespeare format, with the
2-layer-LSTM family (shakespeare_lstm), under MPI: the run gives what one process gives, its loss falls, and the
recorded token accuracy is the final global model's, recomputed by hand from the run file."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from mpi4py import MPI

from pfl_mpi.cli import main
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.config import load_config
from pfl_mpi.data.leaf import VOCAB
from pfl_mpi.models import build_model
from pfl_mpi.runtime import Engine

from ..helpers import committed
from ..test_datasets_fixtures import _leaf_files

COMM = MPI.COMM_WORLD
ROLES = ("HAMLET", "OPHELIA", "HORATIO", "GERTRUDE")
LINES = (
    "To be, or not to be, that is the question. ",
    "Get thee to a nunnery; why wouldst thou be a breeder of sinners? ",
    "There are more things in heaven and earth, Horatio. ",
    "The lady doth protest too much, methinks. ",
)


def write_play(root: Path) -> dict[str, dict]:
    """LEAF's layout: each role's line repeated, cut into 80-character windows (stride 3) and the next
    character; the first fifth of each role's windows is its test split."""
    train, test = {}, {}
    for i, (role, line) in enumerate(zip(ROLES, LINES, strict=True)):
        text = (line * (1 + 600 // len(line)))[i : i + 600]
        assert set(text) <= set(VOCAB)
        windows = [(text[j : j + 80], text[j + 80]) for j in range(0, len(text) - 80, 3)]
        cut = len(windows) // 5
        test[role] = {"x": [w for w, _ in windows[:cut]], "y": [c for _, c in windows[:cut]]}
        train[role] = {"x": [w for w, _ in windows[cut:]], "y": [c for _, c in windows[cut:]]}
    _leaf_files(root, list(ROLES), train, "train")
    _leaf_files(root, list(ROLES), test, "test")
    return test


@pytest.fixture(scope="module")
def play() -> Iterator[tuple[Path, dict]]:
    path = tempfile.mkdtemp(prefix="pfl-play-") if COMM.Get_rank() == 0 else None
    path = Path(COMM.bcast(path, root=0))
    test = write_play(path / "play") if COMM.Get_rank() == 0 else None
    COMM.Barrier()
    yield path, COMM.bcast(test, root=0)
    COMM.Barrier()
    if COMM.Get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


def _sets(root: Path) -> list[str]:
    return [
        "name=play",
        "rounds=5",
        "clients_per_round=null",
        "state_every=1",
        "data.name=shakespeare",
        f"data.root={root / 'play'}",
        "data.num_clients=4",
        "data.min_samples=2",
        "model.name=shakespeare_lstm",
        "model.lstm_hidden=32",
        "train.optimizer=adam",
        "train.lr=0.03",
        "train.local_epochs=3",
        "train.batch_size=16",
        "algorithm.name=fedavg",
    ]


def _check(root: Path, out: Path, sets: list[str], test: dict) -> None:
    """On rank 0: the MPI run against one process, the loss, and the token accuracy recomputed by hand."""
    one = load_config(None, [*sets, f"output={root / 'play-one.h5'}"])
    assert one.task == "auto" and one.model.lstm_layers == 2  # next_token from the data set; LEAF's 2 layers
    assert Engine(one, SerialWorld(), show_progress=False).run() == 0
    tokens = sum(len(t["y"]) for t in test.values())
    for metric, rtol, atol in (("train_loss", 1e-3, 0), ("test_loss", 1e-3, 0), ("test_acc", 0, 1.01 / tokens)):
        a, b = committed(out, "rounds", metric), committed(one.output_path, "rounds", metric)
        # equal up to summation order (the ranks' partial sums), which an LSTM trained with Adam amplifies a little
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=metric)
    loss, acc = committed(out, "rounds", "train_loss"), committed(out, "rounds", "test_acc")
    test_loss = committed(out, "rounds", "test_loss")
    assert loss[-1] < 0.6 * loss[0] and test_loss[-1] < test_loss[0], (loss, test_loss)
    assert acc[-1] > acc[0] and acc[-1] > 5 / len(VOCAB), acc  # far above a guess among 80 characters

    # the recorded token accuracy is the final global model's over every test character, recomputed here
    model = build_model(one.model, (80,), len(VOCAB))
    with h5py.File(out) as f:
        torch.nn.utils.vector_to_parameters(torch.from_numpy(f["global/state/shared"][-1]), model.parameters())
    model.eval()
    hits = total = 0
    for role in ROLES:
        x = torch.tensor([[VOCAB.index(c) for c in w] for w in test[role]["x"]])
        y = torch.tensor([VOCAB.index(c) for c in test[role]["y"]])
        with torch.no_grad():
            hits += int((model(x).argmax(dim=1) == y).sum())
        total += len(y)
    assert acc[-1] == pytest.approx(hits / total, abs=1e-9)


@pytest.mark.mpi(min_size=2)
def test_next_character_training_under_mpi(play: tuple[Path, dict]) -> None:
    root, test = play
    sets = _sets(root)
    out = root / f"play-{COMM.Get_size()}.h5"
    assert main(["run", *(t for s in sets for t in ("--set", s)), "--out", str(out), "--quiet"]) == 0
    failure = None
    if COMM.Get_rank() == 0:
        try:
            _check(root, out, sets, test)
        except AssertionError as err:  # every rank learns it, so that none waits in a collective
            failure = f"{type(err).__name__}: {err!r}"
    failure = COMM.bcast(failure, root=0)
    assert failure is None, failure
