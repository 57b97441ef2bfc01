"""The transport: an algorithm's declared messages as collectives on flat buffers, and the schedule they form.

For one exchange (a :class:`Plan`: the clients grouped by host rank) the transport sizes every buffer from
the declarations (``down``/``eval_down``/``up`` and ``down_numel_of``/``up_numel_of``), marshals the
server's payloads, moves them through the ``World`` (Bcast, Scatterv, Reduce, Gatherv) and hands back what
each side consumes. :meth:`Transport.schedule` derives the same transfers without moving anything, so the
communication predictor (``pfl-mpi bench comm``) and the engine cannot disagree.

Order: an algorithm sees the clients of an exchange in client-id order, whatever the placement: its
``downlink`` is called with sorted ids and a :class:`Collected` uplink arrives sorted; only the buffers in
between are in rank order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .messages import WIRE_DTYPES, Broadcast, Collected, Gathered, PerClient, Phase, WeightedMean, WeightedSum
from .plan import Plan
from .uplink import UplinkBuffer, wire_limit

if TYPE_CHECKING:  # the types only: the wire never imports the algorithms or the communicator
    from ..algorithms import Algorithm
    from ..comm import World


@dataclass(frozen=True)
class Transfer:
    """One collective of a round: its ledger label, the operation and the bytes each rank contributes
    (Bcast/Reduce: the buffer, the same on every rank; Scatterv/Gatherv: each rank's part)."""

    label: str
    op: str
    bytes_per_rank: tuple[int, ...]


def sizes_of(numel_of: Callable[[int], int], clients: Sequence[int]) -> np.ndarray:
    """``numel_of(k)`` of every client, int64."""
    return np.fromiter((numel_of(int(k)) for k in clients), dtype=np.int64, count=len(clients))


def counts_per_rank(plan: Plan, sizes: np.ndarray) -> list[int]:
    """Elements per rank of a Scatterv/Gatherv carrying ``sizes[i]`` elements for client ``plan.order[i]``."""
    ends = np.cumsum([0, *plan.per_rank])
    total = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))
    return [int(total[ends[r + 1]] - total[ends[r]]) for r in range(len(plan.per_rank))]


def wire_array(payload: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A server's downlink payload as a contiguous numpy array of the message's dtype (a copy).

    float32 messages convert any float payload (as they always have); other dtypes must match exactly.
    """
    payload = payload.detach().cpu()
    if tuple(payload.shape) != shape:
        raise ValueError(f"downlink payload has shape {tuple(payload.shape)}, expected {shape}")
    if payload.dtype != dtype and (dtype != torch.float32 or not payload.dtype.is_floating_point):
        raise TypeError(f"downlink payload has dtype {payload.dtype}, the message declares {dtype}")
    return np.array(payload.numpy(), dtype=WIRE_DTYPES[dtype], copy=True, order="C")


def wire_rows(payload, dtype: torch.dtype, sizes: np.ndarray, numel: int) -> np.ndarray:
    """A PerClient downlink (a [clients, numel] tensor, or a list of 1-D payloads of ``sizes``) as one flat
    contiguous array of the message's dtype, the clients' payloads one after another."""
    if isinstance(payload, torch.Tensor):
        if len(set(sizes.tolist())) > 1:
            raise ValueError("downlink payloads differ in size per client: return a list of 1-D tensors")
        return wire_array(payload, dtype, (len(sizes), int(sizes[0]) if len(sizes) else numel)).reshape(-1)
    if len(payload) != len(sizes):
        raise ValueError(f"downlink returned {len(payload)} payloads for {len(sizes)} clients")
    parts = [wire_array(p, dtype, (int(n),)) for p, n in zip(payload, sizes, strict=True)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=WIRE_DTYPES[dtype])


def raw(buf: np.ndarray) -> np.ndarray:
    """What a Bcast/Scatterv/Gatherv moves: float32 buffers as they are, any other dtype as its bytes.

    Moving bytes works for every dtype on every MPI (float16 has no MPI type in the standard), and
    the ledger counts the same bytes either way.
    """
    return buf if buf.dtype == np.float32 else buf.reshape(-1).view(np.uint8)


def _in_rank_order(payload, plan: Plan, ids: list[int]):
    """A PerClient downlink computed for the sorted ``ids``, rearranged into ``plan.order``."""
    if list(plan.order) == ids:
        return payload
    position = {k: i for i, k in enumerate(ids)}
    perm = [position[k] for k in plan.order]
    return payload[torch.as_tensor(perm)] if isinstance(payload, torch.Tensor) else [payload[i] for i in perm]


class Transport:
    """Moves one algorithm's messages over one ``World``; every rank holds one and calls it in step."""

    def __init__(self, world: World, algo: Algorithm):
        self.world, self.algo = world, algo

    def _down_kind(self, phase: Phase) -> tuple[Broadcast | PerClient | None, str]:
        return (self.algo.down, "down") if phase == "train" else (self.algo.eval_down, "eval_down")

    # -- the schedule ---------------------------------------------------------------------------------
    def schedule(self, plan: Plan, phase: Phase = "train") -> list[Transfer]:
        """The downlink and uplink collectives of an exchange with ``plan``'s clients (the uplink only in
        training), in the order the engine calls them."""
        algo, out = self.algo, []
        down, label = self._down_kind(phase)
        if isinstance(down, Broadcast):
            nbytes = algo.down_numel() * WIRE_DTYPES[down.dtype].itemsize
            out.append(Transfer(label, "Bcast", (nbytes,) * len(plan.per_rank)))
        elif isinstance(down, PerClient):
            counts = counts_per_rank(plan, sizes_of(algo.down_numel_of, plan.order))
            out.append(Transfer(label, "Scatterv", tuple(c * WIRE_DTYPES[down.dtype].itemsize for c in counts)))
        if phase != "train":
            return out
        up = algo.up
        if isinstance(up, WeightedSum):
            itemsize = WIRE_DTYPES[up.dtype].itemsize
            if up.dtype == torch.float32:
                out.append(Transfer("up", "Reduce", ((algo.up_numel() + 1) * 4,) * len(plan.per_rank)))
            else:
                out.append(Transfer("up", "Reduce", (algo.up_numel() * itemsize,) * len(plan.per_rank)))
                out.append(Transfer("up", "Reduce", (16,) * len(plan.per_rank)))
        elif isinstance(up, Gathered):
            counts = counts_per_rank(plan, sizes_of(algo.up_numel_of, plan.order))
            out.append(Transfer("up", "Gatherv", tuple(c * WIRE_DTYPES[up.dtype].itemsize for c in counts)))
        return out

    # -- down -----------------------------------------------------------------------------------------
    def down(self, t: int, plan: Plan, phase: Phase) -> list[torch.Tensor | None]:
        """The downlink payload of each of this rank's clients in ``plan`` (in the message's dtype)."""
        algo, world = self.algo, self.world
        mine = plan.of_rank(world.rank)
        down, label = self._down_kind(phase)
        if down is None:
            return [None] * len(mine)
        ids = sorted(plan.order)
        n, wire = algo.down_numel(), WIRE_DTYPES[down.dtype]
        if isinstance(down, Broadcast):
            if world.is_server:
                buf = wire_array(algo.downlink(t, ids, phase), down.dtype, (n,))
            else:
                buf = np.empty(n, dtype=wire)
            world.broadcast(raw(buf), label)
            return [torch.from_numpy(buf)] * len(mine)
        sizes = sizes_of(algo.down_numel_of, plan.order)
        send = None
        if world.is_server:
            send = wire_rows(_in_rank_order(algo.downlink(t, ids, phase), plan, ids), down.dtype, sizes, n)
        own = sizes_of(algo.down_numel_of, mine)
        recv = np.empty(int(own.sum()), dtype=wire)
        scale = wire.itemsize if down.dtype != torch.float32 else 1  # elements of the (raw) buffers
        counts = [c * scale for c in counts_per_rank(plan, sizes)]
        world.scatterv(None if send is None else raw(send), counts, raw(recv), label)
        return list(torch.from_numpy(recv).split(own.tolist()))

    # -- up -------------------------------------------------------------------------------------------
    def uplink_buffer(self, mine: Sequence[int]) -> UplinkBuffer:
        """The buffer this rank's clients of an exchange fill as they train, in ``mine`` order."""
        sizes = sizes_of(self.algo.up_numel_of, mine) if isinstance(self.algo.up, Gathered) else None
        return UplinkBuffer(self.algo.up, self.algo.up_numel(), len(mine), sizes)

    def up(self, plan: Plan, uplink: UplinkBuffer, weights: np.ndarray | None) -> WeightedMean | Collected | None:
        """Move this rank's uplink buffer up; the server gets what its ``aggregate`` takes (``weights``: the
        clients' aggregation weights in ``plan.order``, on the server)."""
        up, world = self.algo.up, self.world
        if isinstance(up, WeightedSum):
            uplink.seal()
            world.reduce_sum(uplink.buf, "up")
            if uplink.side is not None:
                world.reduce_sum(uplink.side, "up")  # summed weight and overflow bound, float64
            return self._weighted_mean(uplink, len(plan.order)) if world.is_server else None
        if isinstance(up, Gathered):
            wire, sizes = uplink.buf.dtype, sizes_of(self.algo.up_numel_of, plan.order)
            recv = np.empty(int(sizes.sum()), dtype=wire) if world.is_server else None
            scale = wire.itemsize if up.dtype != torch.float32 else 1
            counts = [c * scale for c in counts_per_rank(plan, sizes)]
            world.gatherv(raw(uplink.buf), counts, None if recv is None else raw(recv), "up")
            if not world.is_server:
                return None
            return self._collected(plan, torch.from_numpy(recv), sizes, weights, self.algo.up_numel())
        return None

    def _weighted_mean(self, uplink: UplinkBuffer, count: int) -> WeightedMean:
        n = self.algo.up_numel()
        if uplink.side is None:  # float32, the weight in the last slot
            total = float(uplink.buf[n])  # 0 when every client of the round reported weight 0
            summed = uplink.buf[:n]
            mean = summed / total if total else np.zeros(n, dtype=np.float32)
            return WeightedMean(torch.from_numpy(mean), total, count, torch.from_numpy(summed))
        total, bound = float(uplink.side[0]), float(uplink.side[1])
        if bound > wire_limit(uplink.buf.dtype):
            raise OverflowError(
                f"the round's weighted sum can reach {bound:g}, more than {uplink.buf.dtype} holds: "
                "declare a wider WeightedSum dtype"
            )
        summed = uplink.buf
        mean = (summed.astype(np.float64) / total).astype(np.float32) if total else np.zeros(n, np.float32)
        return WeightedMean(torch.from_numpy(mean), total, count, torch.from_numpy(summed))

    @staticmethod
    def _collected(plan: Plan, flat: torch.Tensor, sizes: np.ndarray, weights: np.ndarray, numel: int) -> Collected:
        """The gathered payloads (in rank order in ``flat``) as a Collected in client-id order."""
        order = np.argsort(np.asarray(plan.order, dtype=np.int64), kind="stable")
        clients = [int(plan.order[i]) for i in order]
        weights = torch.from_numpy(np.asarray(weights, dtype=np.float32)[order])
        if len(set(sizes.tolist())) > 1:  # ragged: one 1-D view per client
            rows = list(flat.split(sizes.tolist()))
            return Collected(clients, None, weights, [rows[i] for i in order])
        width = int(sizes[0]) if len(sizes) else numel
        payloads = flat.reshape(len(plan.order), width)
        if not np.array_equal(order, np.arange(len(order))):
            payloads = payloads[torch.from_numpy(order)]
        return Collected(clients, payloads, weights)

    # -- rows of numbers ------------------------------------------------------------------------------
    def gather_rows(self, plan: Plan, rows: np.ndarray, label: str) -> np.ndarray | None:
        """Gatherv of one row per client of ``plan`` (this rank sends its own clients' rows), in rank order."""
        width = rows.shape[1]
        out = np.empty((len(plan.order), width), dtype=rows.dtype) if self.world.is_server else None
        self.world.gatherv(np.ascontiguousarray(rows), [c * width for c in plan.per_rank], out, label)
        return out
