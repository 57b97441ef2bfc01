"""An OSU-style sweep of the collectives the runtime uses, on the ranks it is given (``pfl-mpi bench comm``).

Every operation is rooted at rank 0 and moves contiguous numpy buffers with mpi4py's uppercase
(buffer) methods, completed the way the runtime completes them (``wait="polled"``: started
non-blocking and polled with ``MPIWorld``'s spin-then-sleep loop) or with the blocking calls
(``wait="blocking"``, what OSU measures). For each size: one untimed warm-up call, then
``repeats`` timed calls, each preceded by a barrier; a call's time is the slowest rank's (the
maximum over ranks of the seconds from leaving the barrier to completing the call), and the
figure kept is the median over the repeats.

Sizes are the payload per rank, ``n`` bytes, as the ledger counts it:

- ``Bcast``: rank 0 sends n bytes, every other rank receives n.
- ``Reduce``, ``Allreduce``: every rank contributes n bytes (float32 SUM).
- ``Gatherv``: every rank but 0 sends n bytes to rank 0; ``Scatterv``: rank 0 sends n bytes to
  every other rank (rank 0's own part is empty, as in the runtime, where the server hosts no client).
- ``pickled_bcast``: rank 0 ``comm.send``s an n-byte numpy array to each rank in turn (pickled
  point-to-point, the transport of Python FL simulators); ``pickled_gather``: every rank
  ``comm.send``s one to rank 0, which ``comm.recv``s them in rank order.
- ``np.add``: rank 0 alone, ``np.add(a, b, out=c)`` on n-byte float32 arrays, the in-memory bound
  of a reduce (the other ranks sleep in a barrier meanwhile).

The sweep's ranks enter every call together, so nobody waits. In a round they do not: a rank that
arrived early waits, and a polled wait notices completion only when its sleep ends (up to
``poll_max``, plus the time for the woken process to get a core). ``time_notice`` measures that:
one rank enters ``NOTICE_DELAY`` x poll_max late (times a random factor in [1, 2), so completion
falls at a random point of the sleepers' schedule), and the time from its entry (on the common
clock) until the last early rank sees the call complete is recorded: the transfer plus the notice
delay. ``notice - sweep time`` at the same size is the *wake-up* term that the prediction adds to
every call of a round (``pfl_mpi.costmodel.messages``); with blocking waits it is near 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
from mpi4py import MPI

from .mpi_world import MPIWorld
from .world import WAIT_MODES

OPS = ("Bcast", "Reduce", "Allreduce", "Gatherv", "Scatterv", "pickled_bcast", "pickled_gather", "np.add")
NOTICE_OPS = ("Bcast", "Reduce", "Allreduce", "Gatherv", "Scatterv")  # the buffer collectives of a round
NOTICE_DELAY = 5.0  # the late rank enters 5-10 poll_max late: the early ones sleep poll_max between polls
NOTICE_BYTES = 8


def _quiet_barrier(world: MPIWorld) -> None:
    world._wait(world.comm.Ibarrier())


class Sweep:
    """One rank's part of the sweep; rank 0 gets the results."""

    def __init__(self, world: MPIWorld):
        """Calls complete as ``world`` completes them (its ``wait`` mode and ``poll_max``)."""
        self.world, self.comm = world, world.comm
        self.wait = WAIT_MODES[1] if world.blocking else WAIT_MODES[0]
        self.rank, self.size = world.rank, world.size

    # -- completing a call -----------------------------------------------------------------
    def _do(self, start_nonblocking: Callable[[], MPI.Request], blocking: Callable[[], None]) -> None:
        if self.wait == "blocking":
            blocking()
        else:
            self.world._wait(start_nonblocking())

    def _operation(self, op: str, nbytes: int) -> Callable[[], None]:
        """A callable doing one ``op`` of ``nbytes`` per rank (buffers allocated once, here)."""
        comm, root, n = self.comm, 0, max(nbytes // 4, 1)  # float32 elements
        is_root, peers = self.rank == 0, self.size - 1
        f32 = MPI.FLOAT
        a = np.full(n, self.rank + 1, dtype=np.float32)
        if op == "Bcast":
            return lambda: self._do(lambda: comm.Ibcast(a, root=root), lambda: comm.Bcast(a, root=root))
        if op in ("Reduce", "Allreduce"):
            out = np.empty(n, dtype=np.float32)
            if op == "Allreduce":
                return lambda: self._do(lambda: comm.Iallreduce(a, out), lambda: comm.Allreduce(a, out))
            recv = out if is_root else None
            return lambda: self._do(lambda: comm.Ireduce(a, recv, root=root), lambda: comm.Reduce(a, recv, root=root))
        counts = [0] + [n] * peers
        displs = [0] + [n * i for i in range(peers)]
        if op == "Gatherv":
            whole = np.empty(n * peers, dtype=np.float32) if is_root else None
            send = a[:0] if is_root else a
            spec = [whole, counts, displs, f32] if is_root else None
            return lambda: self._do(
                lambda: comm.Igatherv(send, spec, root=root), lambda: comm.Gatherv(send, spec, root=root)
            )
        if op == "Scatterv":
            whole = np.ones(n * peers, dtype=np.float32) if is_root else None
            recv = a[:0] if is_root else a
            spec = [whole, counts, displs, f32] if is_root else None
            return lambda: self._do(
                lambda: comm.Iscatterv(spec, recv, root=root), lambda: comm.Scatterv(spec, recv, root=root)
            )
        if op == "pickled_bcast":

            def pickled_bcast() -> None:
                if is_root:
                    for r in range(1, self.size):
                        comm.send(a, dest=r, tag=7)
                else:
                    comm.recv(source=root, tag=7)

            return pickled_bcast
        if op == "pickled_gather":

            def pickled_gather() -> None:
                if is_root:
                    for r in range(1, self.size):
                        comm.recv(source=r, tag=8)
                else:
                    comm.send(a, dest=root, tag=8)

            return pickled_gather
        raise ValueError(f"unknown operation {op}")

    # -- timing ----------------------------------------------------------------------------
    def time_op(self, op: str, nbytes: int, repeats: int) -> np.ndarray:
        """The slowest rank's seconds of each of ``repeats`` calls (rank 0; others get an empty array)."""
        if op == "np.add":
            return self._time_numpy(nbytes, repeats)
        call = self._operation(op, nbytes)
        call()  # warm-up: first touch of the pages, MPI's shared-memory set-up
        times = np.empty(repeats)
        mine = np.zeros(1)
        slowest = np.zeros(1)
        for i in range(repeats):
            self.comm.Barrier()
            start = time.perf_counter()
            call()
            mine[0] = time.perf_counter() - start
            self.comm.Reduce(mine, slowest, op=MPI.MAX, root=0)
            times[i] = slowest[0]
        return times if self.rank == 0 else np.zeros(0)

    def time_notice(self, op: str, repeats: int, seed: int = 0) -> np.ndarray:
        """Seconds from a late rank's entry into an 8-byte ``op`` until the last early rank has seen it
        complete, for each of ``repeats`` calls (rank 0; others get an empty array).

        The late rank is the one the others wait for in a round: the root for Bcast and Scatterv (the
        workers wait for the server), the last rank for Reduce, Allreduce and Gatherv (the server waits
        for the workers)."""
        call = self._operation(op, NOTICE_BYTES)
        call()
        late = 0 if op in ("Bcast", "Scatterv") else self.size - 1
        delay = NOTICE_DELAY * (0.0 if self.wait == "blocking" else self.world.poll_max) + 1e-3
        rng = np.random.default_rng([seed, NOTICE_OPS.index(op)])
        times = np.empty(repeats)
        mine, last = np.zeros(2), np.zeros(2)  # (entry, seen complete), on the common clock
        for i in range(repeats):
            sleep = delay * (1.0 + rng.random())  # the same on every rank (same seed): only ``late`` uses it
            self.comm.Barrier()
            if self.rank == late:
                time.sleep(sleep)
            mine[0] = self.world.now()
            call()
            mine[1] = self.world.now() if self.rank != late else -np.inf
            self.comm.Reduce(mine, last, op=MPI.MAX, root=0)
            times[i] = last[1] - last[0]
        return times if self.rank == 0 else np.zeros(0)

    def notice(self, repeats: int, ops: Sequence[str] = NOTICE_OPS) -> dict[str, np.ndarray]:
        """{op: [repeats] seconds} of ``time_notice`` on rank 0 ({} elsewhere)."""
        out = {op: self.time_notice(op, repeats) for op in ops}
        _quiet_barrier(self.world)
        return out if self.rank == 0 else {}

    def _time_numpy(self, nbytes: int, repeats: int) -> np.ndarray:
        times = np.zeros(0)
        if self.rank == 0:
            n = max(nbytes // 4, 1)
            a, b, c = np.ones(n, np.float32), np.ones(n, np.float32), np.empty(n, np.float32)
            np.add(a, b, out=c)
            times = np.empty(repeats)
            for i in range(repeats):
                start = time.perf_counter()
                np.add(a, b, out=c)
                times[i] = time.perf_counter() - start
        _quiet_barrier(self.world)
        return times

    def run(
        self,
        sizes: Sequence[int],
        repeats: int,
        ops: Sequence[str] = OPS,
        progress: Callable[[str], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """{op: [len(sizes), repeats] seconds} on rank 0 ({} elsewhere)."""
        out = {op: np.empty((len(sizes), repeats)) for op in ops}
        for i, nbytes in enumerate(sizes):
            for op in ops:
                times = self.time_op(op, int(nbytes), repeats)
                if self.rank == 0:
                    out[op][i] = times
            if progress is not None and self.rank == 0:
                progress(f"{int(nbytes)} B done")
        _quiet_barrier(self.world)
        return out if self.rank == 0 else {}


def library_versions() -> dict[str, str]:
    """MPI library and mpi4py versions (for the result file's attributes)."""
    import mpi4py

    return {
        "mpi_library": MPI.Get_library_version().strip().splitlines()[0].strip(),
        "mpi_standard": "{}.{}".format(*MPI.Get_version()),
        "mpi4py": mpi4py.__version__,
        "numpy": np.__version__,
    }
