"""Novel clients on P ranks: the held-out clients, their serving (FedPer's head fit, pFedHN's embedding exchanges)
and its record equal one process's, straight and resumed."""

from __future__ import annotations

import numpy as np
import pytest

from pfl_mpi.comm.mpi_world import MPIWorld
from pfl_mpi.comm.serial import SerialWorld
from pfl_mpi.runtime import Engine

from ..helpers import committed, tiny_config

NOVEL = {"data.novel_clients": 3, "clients_per_round": 4, "rounds": 3}
FAST = {"algorithm.inner_steps": 3, "novel.steps": 3, "novel.lr": 0.5}


def _run(cfg, world, resume: bool = False) -> Engine:
    engine = Engine(cfg, world, resume=resume, show_progress=False)
    assert engine.run() == 0
    return engine


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", ["fedper", "pfedhn-pc"])
def test_novel_clients_on_p_ranks_and_resumed_equal_one_process(mpi_tmp_path, name):
    world = MPIWorld()
    sets = {**NOVEL, **(FAST if name.startswith("pfedhn") else {})}
    straight = _run(tiny_config(mpi_tmp_path / f"{name}.h5", name, **sets), world).cfg.output_path
    resumed = mpi_tmp_path / f"{name}-resumed.h5"
    _run(tiny_config(resumed, name, **{**sets, "rounds": 2}), world)
    assert _run(tiny_config(resumed, name, **sets), world, resume=True).start_round == 2
    if world.rank != 0:
        return
    one = _run(tiny_config(mpi_tmp_path / f"{name}-one.h5", name, **sets), SerialWorld())
    for path in (straight, resumed):
        for metric in ("novel_test_acc", "novel_test_loss", "protocol_novel_bytes_down", "protocol_novel_bytes_up"):
            mine, expected = (
                committed(path, "clients", metric)[-1],
                committed(one.cfg.output_path, "clients", metric)[-1],
            )
            np.testing.assert_allclose(mine, expected, rtol=1e-5, atol=1e-6, err_msg=metric)
        participated = committed(path, "clients", "participated").astype(bool)
        assert not participated[:, one.novel].any()
        np.testing.assert_allclose(
            committed(path, "rounds", "test_acc"), committed(one.cfg.output_path, "rounds", "test_acc"), atol=1e-6
        )
    assert np.isfinite(committed(one.cfg.output_path, "clients", "novel_test_acc")[-1, one.novel]).all()
