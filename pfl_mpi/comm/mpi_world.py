"""The world over MPI: non-blocking collectives on flat numpy buffers, completed by polling.

A rank blocked in an MPI call busy-polls and takes a core from the ranks that are computing
(measured with MPICH on a 2-core machine). So every collective here is started non-blocking and
completed by ``Test()``: first a short spin (a quick collective never sleeps), then sleeps that
double from ``POLL_MIN`` up to ``poll_max``, each followed by a short burst of ``Test()`` calls,
because MPICH advances a collective by one stage per call (a tree of ranks needs several).
Long waits cost almost no CPU.

Waiting: every call records its entry time on a common clock (``time.perf_counter()`` minus this
rank's offset to rank 0, estimated at start-up by ping-pong, ``sync_clocks``); when the ledger is
packed, one Allgather of those entry times tells every rank when the last rank entered each call.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from mpi4py import MPI
from mpi4py.util.dtlib import from_numpy_dtype

from .ledger import waiting_of
from .world import BURST, POLL_MAX_MS, POLL_MIN, SERVER, SPIN, WAIT_MODES, World

ABORT_FORWARD_SECONDS = 1.0  # time the launcher gets to forward a failing rank's last output before Abort
SYNC_PINGS = 16  # ping-pongs per rank when estimating clock offsets (the fastest one is kept)


class MPIWorld(World):
    """A world of MPI ranks (``MPI.COMM_WORLD``)."""

    def __init__(self, poll_max: float = POLL_MAX_MS / 1000, wait: str = "polled") -> None:
        """``wait``: "polled" (spin, then sleep up to ``poll_max`` seconds between polls) or
        "blocking" (MPI's own wait, which busy-polls: the lowest latency, a full core per waiting rank)."""
        super().__init__()
        self.configure(poll_max, wait)
        self.comm = MPI.COMM_WORLD.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.hosts = self.comm.allgather(MPI.Get_processor_name())  # small metadata, once
        self.clock_offset, self.clock_error = self.sync_clocks()
        self.ledger.resolve_entries = self._allgather_entries

    def configure(self, poll_max: float, wait: str) -> None:
        if wait not in WAIT_MODES:
            raise ValueError(f"wait must be one of {WAIT_MODES}, not {wait!r}")
        self.blocking, self.poll_max = wait == "blocking", poll_max

    def agree(self, failure: str | None) -> tuple[int, str] | None:
        self.barrier()  # polled: a rank still validating does not make the others spin
        every = self.comm.allgather(failure)  # pickled, once per run
        return next(((rank, text) for rank, text in enumerate(every) if text is not None), None)

    # -- a common clock -------------------------------------------------------------------
    def now(self) -> float:
        """This rank's clock shifted onto rank 0's: comparable between ranks within ``clock_error``."""
        return time.perf_counter() - self.clock_offset

    def sync_clocks(self, pings: int = SYNC_PINGS) -> tuple[float, float]:
        """(offset, error) of this rank's ``perf_counter`` to rank 0's: Cristian's algorithm, the
        fastest of ``pings`` round trips; error is half that round trip (the offset's bound)."""
        t = np.zeros(1)
        result = np.zeros(2)  # offset, error
        results = np.zeros((self.size, 2)) if self.is_server else None
        if self.is_server:
            for rank in range(1, self.size):
                best = (np.inf, 0.0)
                self.comm.Send(t, dest=rank, tag=1)  # start: the rank has been polling, not spinning
                for _ in range(pings):
                    before = time.perf_counter()
                    self.comm.Send(t, dest=rank, tag=2)
                    self.comm.Recv(t, source=rank, tag=3)
                    after = time.perf_counter()
                    if after - before < best[0]:
                        best = (after - before, float(t[0]) - 0.5 * (before + after))
                results[rank] = best[1], 0.5 * best[0]
        elif self.size > 1:
            self._wait(self.comm.Irecv(t, source=SERVER, tag=1))
            for _ in range(pings):
                self.comm.Recv(t, source=SERVER, tag=2)
                t[0] = time.perf_counter()
                self.comm.Send(t, dest=SERVER, tag=3)
        self._wait(self.comm.Iscatter(results, result, root=SERVER))
        return float(result[0]), float(result[1])

    def _allgather_entries(self, own: np.ndarray) -> np.ndarray:
        """Every rank's entry times of the same calls, [ranks, calls] (counted under ``ledger``).

        The Allgather carries its own entry time as a last column, so its waiting is known too."""
        start = time.perf_counter()
        mine = np.append(np.asarray(own, dtype=np.float64), start - self.clock_offset)
        every = np.empty((self.size, mine.size), dtype=np.float64)
        cpu = time.process_time()
        self._wait(self.comm.Iallgather(mine, every))
        seconds = time.perf_counter() - start
        waiting = float(waiting_of(every[:, -1:], mine[-1:], np.array([seconds]))[0])
        self.ledger.record(
            "ledger", mine.nbytes, mine.nbytes * (self.size - 1), seconds, time.process_time() - cpu, waiting=waiting
        )
        return every[:, :-1]

    # -- completion -----------------------------------------------------------------------
    def _wait(self, request: MPI.Request) -> None:
        if self.blocking:
            request.Wait()
            return
        delay, spin_until = POLL_MIN, time.perf_counter() + SPIN
        while not request.Test():
            if time.perf_counter() < spin_until:
                continue
            time.sleep(delay)
            delay = min(2.0 * delay, self.poll_max)
            spin_until = time.perf_counter() + BURST

    def _complete(self, request: MPI.Request, label: str, sent: int, received: int, start: float) -> None:
        cpu = time.process_time()
        self._wait(request)
        end = time.perf_counter()
        self.ledger.record(
            label, sent, received, end - start, time.process_time() - cpu, entered=start - self.clock_offset
        )

    @staticmethod
    def _spec(buf: np.ndarray, counts: Sequence[int]) -> list:
        displs = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
        return [buf, list(map(int, counts)), list(map(int, displs)), from_numpy_dtype(buf.dtype)]

    # -- collectives ----------------------------------------------------------------------
    def broadcast(self, buf: np.ndarray, label: str) -> None:
        start = time.perf_counter()
        request = self.comm.Ibcast(buf, root=SERVER)
        peers = self.size - 1
        sent, received = (buf.nbytes * peers, 0) if self.is_server else (0, buf.nbytes)
        self._complete(request, label, sent, received, start)

    def scatterv(self, send: np.ndarray | None, counts: Sequence[int], recv: np.ndarray, label: str) -> None:
        start = time.perf_counter()
        if self.is_server:
            assert send is not None
            request = self.comm.Iscatterv(self._spec(send, counts), MPI.IN_PLACE, root=SERVER)
            sent, received = (sum(counts) - counts[SERVER]) * send.itemsize, 0
            recv.reshape(-1)[:] = send.reshape(-1)[: counts[SERVER]]  # the root's own part (P = 1)
        else:
            request = self.comm.Iscatterv(None, recv, root=SERVER)
            sent, received = 0, recv.nbytes
        self._complete(request, label, sent, received, start)

    def reduce_sum(self, buf: np.ndarray, label: str) -> None:
        start = time.perf_counter()
        if self.is_server:
            request = self.comm.Ireduce(MPI.IN_PLACE, buf, op=MPI.SUM, root=SERVER)
            sent, received = 0, buf.nbytes * (self.size - 1)
        else:
            request = self.comm.Ireduce(buf, None, op=MPI.SUM, root=SERVER)
            sent, received = buf.nbytes, 0
        self._complete(request, label, sent, received, start)

    def gatherv(self, send: np.ndarray, counts: Sequence[int], recv: np.ndarray | None, label: str) -> None:
        start = time.perf_counter()
        if self.is_server:
            assert recv is not None
            recv.reshape(-1)[: counts[SERVER]] = send.reshape(-1)  # the root's own part (P = 1)
            request = self.comm.Igatherv(MPI.IN_PLACE, self._spec(recv, counts), root=SERVER)
            sent, received = 0, (sum(counts) - counts[SERVER]) * recv.itemsize
        else:
            request = self.comm.Igatherv(send, None, root=SERVER)
            sent, received = send.nbytes, 0
        self._complete(request, label, sent, received, start)

    def gather_rows(self, row: np.ndarray, label: str) -> np.ndarray | None:
        row = np.ascontiguousarray(row, dtype=np.float64)
        out = np.empty((self.size, row.size), dtype=np.float64) if self.is_server else None
        self.gatherv(row, [row.size] * self.size, out, label)
        return out

    def abort(self, code: int) -> None:
        # MPI_Abort kills the launcher's proxies at once, and what a rank wrote just before (its traceback)
        # may still sit in the pipe to its proxy: give the launcher a moment to forward it first.
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_FORWARD_SECONDS)
        MPI.COMM_WORLD.Abort(code)

    def exit(self, code: int) -> None:
        self.comm.Free()
        MPI.Finalize()
        super().exit(code)

    def barrier(self) -> None:
        self._wait(self.comm.Ibarrier())
