"""Evaluation rounds: per-client payloads go down in bounded blocks, and only to algorithms that read them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pfl_mpi.runtime import Engine, evaluation

from .helpers import RecordingWorld, committed, tiny_config


def _run(cfg) -> RecordingWorld:
    world = RecordingWorld()
    assert Engine(cfg, world, show_progress=False).run() == 0
    return world


def test_per_client_payloads_are_evaluated_in_blocks_with_the_same_results(tmp_path, monkeypatch):
    """pFedHN generates theta_i per client: with a bound of 3 payloads the server builds them 3 at a time
    (4 Scatterv for 10 clients per evaluation), and every metric equals one block of all 10."""
    sets = {"rounds": 2, "model.name": "logreg", "algorithm.inner_steps": 2}
    whole = tiny_config(tmp_path / "whole.h5", "pfedhn", **sets)
    calls_whole = [c for c in _run(whole).calls if c[1] == "eval_down"]
    assert len(calls_whole) == 2  # one per evaluated round
    payload = calls_whole[0][3] // 10  # bytes of one client's theta
    monkeypatch.setattr(evaluation, "EVAL_BLOCK_BYTES", 3 * payload)
    blocks = tiny_config(tmp_path / "blocks.h5", "pfedhn", **sets)
    calls_blocks = [c for c in _run(blocks).calls if c[1] == "eval_down"]
    assert len(calls_blocks) == 2 * math.ceil(10 / 3)
    assert sorted({c[3] for c in calls_blocks}) == [payload, 3 * payload]
    assert sum(c[3] for c in calls_blocks) == sum(c[3] for c in calls_whole)
    for name in ("test_acc", "test_loss"):  # theta of 3 clients at a time: the same up to float rounding
        for table in ("rounds", "clients"):
            a, b = (committed(c.output_path, table, name) for c in (blocks, whole))
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=f"{table}/{name}")


@pytest.mark.parametrize(
    "algorithm,sets", [("fedgkt", {}), ("fedmd", {"data.public.size": 200, "algorithm.alignment_size": 50})]
)
def test_algorithms_that_evaluate_their_own_state_receive_nothing(tmp_path, algorithm, sets):
    cfg = tiny_config(tmp_path / f"{algorithm}.h5", algorithm, rounds=2, **sets)
    calls = _run(cfg).calls
    assert not [c for c in calls if c[1] == "eval_down"]
    assert [c for c in calls if c[1] == "eval_metrics"]  # evaluated all the same
    assert np.all(np.isfinite(committed(cfg.output_path, "rounds", "test_acc")))
