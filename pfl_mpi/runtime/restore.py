"""Continuing a run file: the client states of its checkpoint, back on the workers that host them."""

from __future__ import annotations

import numpy as np

from ..comm import World
from ..store.layout import StateLayout
from ..store.writer import block_rows
from ..wire.plan import make_plan
from ..wire.transport import counts_per_rank
from .client_store import ClientStore


def scatter_client_states(
    world: World, layout: StateLayout, tables: dict, host: np.ndarray, store: ClientStore | None
) -> None:
    """Scatter every client's state (``tables``: the checkpoint's, read on rank 0) to the worker hosting it, in
    blocks of clients, so that rank 0 never holds all N states at once; ``store`` receives them on a worker."""
    num_clients = len(host)
    rows = block_rows(int(layout.group_numel.max()))
    for start in range(0, num_clients, rows):
        block = make_plan(np.arange(start, min(start + rows, num_clients)), host, world.size)
        send = layout.read(tables, block.order) if world.is_server else None
        mine = block.of_rank(world.rank)
        recv = np.empty(int(layout.numels(mine).sum()), dtype=np.float32)
        world.scatterv(send, counts_per_rank(block, layout.numels(block.order)), recv, "restore")
        if world.is_worker:
            store.unpack(mine, recv)
