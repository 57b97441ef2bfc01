"""The round loop every rank runs, each in its role: the server (rank 0) and the workers.

One round, in the order the messages go (labels of the ledger in brackets):

1. [control]  Bcast of (round, status): the server says continue, or stop with an exit code.
2. [down]     the algorithm's downlink: Bcast of one payload, or Scatterv of one per client.
3.            each worker trains its sampled clients one after another (``client_update``).
4. [metrics]  Gatherv of each sampled client's (id, weight, samples, metrics).
5. [up]       the algorithm's uplink: one Reduce of the pre-summed weighted payloads, or Gatherv.
6.            the server aggregates (``aggregate``).
7. [state]    Gatherv of the personal state of the clients that trained (for the checkpoint).
8. [eval_down, eval_metrics] on evaluation rounds: every client's payload down, its test metrics up.
9. [ledger]   Gather of every rank's message counters and timings; the server writes the round.

Everything that is random derives from (seed, client, round); placement only decides where
things are computed, never what.
"""

from __future__ import annotations

import importlib.metadata
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import __version__
from ..algorithms import (
    Algorithm,
    Broadcast,
    Client,
    Collected,
    Gathered,
    PerClient,
    WeightedMean,
    WeightedSum,
)
from ..algorithms.base import WIRE_DTYPES
from ..comm import FIELDS, LABELS, World
from ..config import RunConfig
from ..data import ClientData, load_federated
from ..errors import DivergenceError
from ..store import RunWriter
from ..store.layout import StateLayout
from ..store.writer import block_rows
from .build import build_algorithm
from .client_store import ClientStore
from .cluster import job_attributes
from .device import select_device, set_threads
from .placement import Plan, make_plan, place_clients, sample_clients
from .progress import Progress
from .record import (
    EVAL_COLUMNS,
    FINETUNE_COLUMNS,
    GLOBAL_COLUMNS,
    META_COLUMNS,
    RANK_FIELDS,
    RoundRecord,
    non_finite,
    summarise,
    write,
)
from .seeding import client_generator
from .uplink import UplinkBuffer, wire_limit

EXIT_DIVERGED = 3
EVAL_BLOCK_BYTES = 64 << 20  # at most this much of per-client evaluation payloads at once on the server


def _to_device(data: ClientData, device: torch.device) -> ClientData:
    return ClientData(*(t.to(device) for t in (data.x_train, data.y_train, data.x_test, data.y_test)))


def _wire_array(payload: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A server's downlink payload as a contiguous numpy array of the message's dtype (a copy).

    float32 messages convert any float payload (as they always have); other dtypes must match exactly.
    """
    payload = payload.detach().cpu()
    if tuple(payload.shape) != shape:
        raise ValueError(f"downlink payload has shape {tuple(payload.shape)}, expected {shape}")
    if payload.dtype != dtype and (dtype != torch.float32 or not payload.dtype.is_floating_point):
        raise TypeError(f"downlink payload has dtype {payload.dtype}, the message declares {dtype}")
    return np.array(payload.numpy(), dtype=WIRE_DTYPES[dtype], copy=True, order="C")


def _sizes(numel_of, clients) -> np.ndarray:
    """``numel_of(k)`` of every client, int64."""
    return np.fromiter((numel_of(int(k)) for k in clients), dtype=np.int64, count=len(clients))


def _wire_rows(payload, dtype: torch.dtype, sizes: np.ndarray, numel: int) -> np.ndarray:
    """A PerClient downlink (a [clients, numel] tensor, or a list of 1-D payloads of ``sizes``) as one flat
    contiguous array of the message's dtype, the clients' payloads one after another."""
    if isinstance(payload, torch.Tensor):
        if len(set(sizes.tolist())) > 1:
            raise ValueError("downlink payloads differ in size per client: return a list of 1-D tensors")
        return _wire_array(payload, dtype, (len(sizes), int(sizes[0]) if len(sizes) else numel)).reshape(-1)
    if len(payload) != len(sizes):
        raise ValueError(f"downlink returned {len(payload)} payloads for {len(sizes)} clients")
    parts = [_wire_array(p, dtype, (int(n),)) for p, n in zip(payload, sizes, strict=True)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=WIRE_DTYPES[dtype])


def _raw(buf: np.ndarray) -> np.ndarray:
    """What a Bcast/Scatterv/Gatherv moves: float32 buffers as they are, any other dtype as its bytes.

    Moving bytes works for every dtype on every MPI (float16 has no MPI type in the standard), and
    the ledger counts the same bytes either way.
    """
    return buf if buf.dtype == np.float32 else buf.reshape(-1).view(np.uint8)


@dataclass
class RoundTimes:
    """Seconds of one round on this rank, by activity."""

    compute: float = 0.0
    aggregate: float = 0.0
    start_wall: float = field(default_factory=time.perf_counter)
    start_cpu: float = field(default_factory=time.process_time)

    def row(self) -> list[float]:
        return [
            self.compute,
            self.aggregate,
            time.process_time() - self.start_cpu,
            time.perf_counter() - self.start_wall,
        ]


class Engine:
    """Builds a run on this rank and runs its rounds."""

    def __init__(self, cfg: RunConfig, world: World, resume: bool = False, show_progress: bool = True):
        self.cfg, self.world = cfg, world
        set_threads(cfg.threads)
        self.data = load_federated(cfg.data, cfg.seed)
        self.num_clients = self.data.num_clients
        self.host = place_clients(self.data.train_sizes, world.workers)
        self.all_clients = make_plan(np.arange(self.num_clients), self.host, world.size)
        self.hosted = self.all_clients.of_rank(world.rank)
        self.device = select_device(cfg.device, world.local_rank) if world.is_worker else torch.device("cpu")
        self.algo: Algorithm = build_algorithm(cfg, self.data, self.device)
        groups = self.algo.setup.groups
        self.layout = StateLayout(self.algo.state_specs(), groups)  # each client's state, by architecture group
        self.metric_names = self.algo.client_metrics
        self.stop_code = 0
        self.start_round = 0
        self.writer: RunWriter | None = None
        self.pending: RoundRecord | None = None
        if world.is_worker:
            self.store = ClientStore(self.layout.specs, self.hosted, self.algo.init_client_state, groups)
            self.client_data = {k: _to_device(self.data.client(k), self.device) for k in self.hosted}
        histograms = self._label_histograms()
        self.algo.setup.label_distribution = self._label_distribution(histograms)
        if world.is_server:
            self.algo.init_server()
        if resume:
            self._restore()
        elif world.is_server:
            self.writer = self._create_file(histograms)
        self.progress = Progress(cfg.rounds, self.start_round, enabled=show_progress and world.is_server)

    def _label_histograms(self) -> np.ndarray | None:
        """Training samples per class of every client, int64 [N, C], on the server (None elsewhere).

        Each worker counts the clients it hosts, one Gatherv: no rank loads (or, for synthetic data,
        generates) a client it does not host.
        """
        c = self.data.num_classes
        mine = np.zeros((len(self.hosted), c), dtype=np.int64)
        for i, k in enumerate(self.hosted if self.world.is_worker else ()):
            mine[i] = np.bincount(self.client_data[k].y_train.cpu().numpy(), minlength=c)
        rows = self._gather_rows(self.all_clients, mine, "setup")
        if rows is None:
            return None
        histograms = np.empty_like(rows)
        histograms[self.all_clients.order] = rows
        return histograms

    def _label_distribution(self, histograms: np.ndarray | None) -> torch.Tensor:
        """Class frequencies of all training data: summed on the server, one Bcast."""
        counts = np.zeros(self.data.num_classes, dtype=np.float64)
        if histograms is not None:
            counts[:] = histograms.sum(axis=0)
        self.world.broadcast(counts, "setup")
        return torch.from_numpy(counts / counts.sum()).float()

    # -- the file -------------------------------------------------------------------------
    def _create_file(self, histograms: np.ndarray) -> RunWriter:
        import h5py

        cfg, data = self.cfg, self.data
        attrs = {
            "name": cfg.name,
            "config": cfg.to_yaml(),
            "algorithm": cfg.algorithm["name"],
            "seed": cfg.seed,
            "rounds_planned": cfg.rounds,
            "num_clients": self.num_clients,
            "world_size": self.world.size,
            "hosts": self.world.hosts,
            **job_attributes(),  # SLURM job, GPUs
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "comm_labels": list(LABELS),
            "comm_fields": list(FIELDS),
            "rank_fields": list(RANK_FIELDS),
            "versions": {
                "pfl_mpi": __version__,
                "torch": torch.__version__,
                "numpy": np.__version__,
                "h5py": h5py.__version__,
                "mpi4py": importlib.metadata.version("mpi4py"),
            },
        }
        partition = {
            "train_sizes": data.train_sizes,
            "test_sizes": data.test_sizes,
            "label_histograms": histograms,
            "host_rank": self.host,
            **data.partition_columns(),  # client_names (LEAF users, ...), val_sizes
            **self.layout.partition(),
        }

        def init_state(k: int) -> dict[str, np.ndarray]:
            return {name: v.numpy() for name, v in self.algo.init_client_state(k).items()}

        return RunWriter.create(
            self.cfg.output_path, attrs, partition, self.layout.tables(), init_state, self.num_clients
        )

    def _restore(self) -> None:
        """Continue a run file: server state from its checkpoint, client states scattered to their hosts
        in blocks of clients, so that rank 0 never holds all N states."""
        w = self.world
        done = np.zeros(1, dtype=np.int64)
        if w.is_server:
            plan = {"rounds_planned": self.cfg.rounds, "config": self.cfg.to_yaml()}
            self.writer, done[0] = RunWriter.reopen(self.cfg.output_path, plan)
        w.broadcast(done, "restore")
        self.start_round = int(done[0])
        if self.start_round == 0:
            return
        tables = {}
        if w.is_server:
            server, tables = self.writer.read_checkpoint(self.start_round)
            self.algo.load_server_state({k: torch.from_numpy(v) for k, v in server.items()})
            self.writer.carry_over(self.start_round)
        if self.layout.empty:
            return
        rows = block_rows(int(self.layout.group_numel.max()))
        for start in range(0, self.num_clients, rows):
            stop = min(start + rows, self.num_clients)
            block = make_plan(np.arange(start, stop), self.host, w.size)
            send = self.layout.read(tables, block.order) if w.is_server else None
            mine = block.of_rank(w.rank)
            recv = np.empty(int(self.layout.numels(mine).sum()), dtype=np.float32)
            w.scatterv(send, self._counts(block, self.layout.numels(block.order)), recv, "restore")
            if w.is_worker:
                self.store.unpack(mine, recv)

    # -- messages -------------------------------------------------------------------------
    def _down(self, t: int, plan: Plan, label: str) -> list[torch.Tensor | None]:
        """The downlink payload of each of this rank's clients in ``plan``, in the message's dtype."""
        mine, down = plan.of_rank(self.world.rank), self.algo.down
        if down is None:
            return [None] * len(mine)
        n, wire = self.algo.down_numel(), WIRE_DTYPES[down.dtype]
        if isinstance(down, Broadcast):
            buf = (
                _wire_array(self.algo.downlink(t, plan.order), down.dtype, (n,))
                if self.world.is_server
                else np.empty(n, dtype=wire)
            )
            self.world.broadcast(_raw(buf), label)
            payload = torch.from_numpy(buf)
            return [payload] * len(mine)
        assert isinstance(down, PerClient)
        sizes = _sizes(self.algo.down_numel_of, plan.order)
        send = _wire_rows(self.algo.downlink(t, plan.order), down.dtype, sizes, n) if self.world.is_server else None
        own = _sizes(self.algo.down_numel_of, mine)
        recv = np.empty(int(own.sum()), dtype=wire)
        scale = wire.itemsize if down.dtype != torch.float32 else 1  # elements of the (raw) buffers
        counts = [c * scale for c in self._counts(plan, sizes)]
        self.world.scatterv(None if send is None else _raw(send), counts, _raw(recv), label)
        return list(torch.from_numpy(recv).split(own.tolist()))

    def _up(self, plan: Plan, uplink: UplinkBuffer, weights: np.ndarray | None) -> WeightedMean | Collected | None:
        """Move this rank's uplink buffer up; the server gets what its ``aggregate`` takes."""
        up, n, w = self.algo.up, self.algo.up_numel(), self.world
        if isinstance(up, WeightedSum):
            uplink.seal()
            w.reduce_sum(uplink.buf, "up")
            if uplink.side is not None:
                w.reduce_sum(uplink.side, "up")  # summed weight and overflow bound, float64
            if not w.is_server:
                return None
            if uplink.side is None:  # float32, the weight in the last slot: as it always was
                total = float(uplink.buf[n])  # 0 when every client of the round reported weight 0
                summed = uplink.buf[:n]
                mean = summed / total if total else np.zeros(n, dtype=np.float32)
                return WeightedMean(torch.from_numpy(mean), total, len(plan.order), torch.from_numpy(summed))
            total, bound = float(uplink.side[0]), float(uplink.side[1])
            if bound > wire_limit(uplink.buf.dtype):
                raise OverflowError(
                    f"the round's weighted sum can reach {bound:g}, more than {uplink.buf.dtype} holds: "
                    "declare a wider WeightedSum dtype"
                )
            summed = uplink.buf
            mean = (summed.astype(np.float64) / total).astype(np.float32) if total else np.zeros(n, np.float32)
            return WeightedMean(torch.from_numpy(mean), total, len(plan.order), torch.from_numpy(summed))
        if isinstance(up, Gathered):
            wire, sizes = uplink.buf.dtype, _sizes(self.algo.up_numel_of, plan.order)
            recv = np.empty(int(sizes.sum()), dtype=wire) if w.is_server else None
            scale = wire.itemsize if up.dtype != torch.float32 else 1
            counts = [c * scale for c in self._counts(plan, sizes)]
            w.gatherv(_raw(uplink.buf), counts, None if recv is None else _raw(recv), "up")
            if w.is_server:
                flat, weights = torch.from_numpy(recv), torch.from_numpy(weights.astype(np.float32))
                if len(set(sizes.tolist())) > 1:  # ragged: one 1-D view per client
                    return Collected(plan.order, None, weights, list(flat.split(sizes.tolist())))
                return Collected(plan.order, flat.reshape(len(plan.order), int(sizes[0]) if len(sizes) else n), weights)
        return None

    @staticmethod
    def _counts(plan: Plan, sizes: np.ndarray) -> list[int]:
        """Elements per rank of a Scatterv/Gatherv carrying ``sizes[i]`` elements for client ``plan.order[i]``."""
        ends = np.cumsum([0, *plan.per_rank])
        total = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))
        return [int(total[ends[r + 1]] - total[ends[r]]) for r in range(len(plan.per_rank))]

    def _gather_rows(self, plan: Plan, rows: np.ndarray, label: str) -> np.ndarray | None:
        """Gatherv of one float row per client of ``plan`` (this rank sends its own clients' rows)."""
        width = rows.shape[1]
        out = np.empty((len(plan.order), width), dtype=rows.dtype) if self.world.is_server else None
        self.world.gatherv(np.ascontiguousarray(rows), [c * width for c in plan.per_rank], out, label)
        return out

    def _client(self, k: int, t: int) -> Client:
        return Client(k, t, self.client_data[k], self.store.views(k), client_generator(self.cfg.seed, k, t))

    # -- one round ------------------------------------------------------------------------
    def _round(self, t: int) -> int:
        w, cfg, times = self.world, self.cfg, RoundTimes()
        control = np.array([t, self.stop_code], dtype=np.int64)
        w.broadcast(control, "control")
        if control[1]:
            return int(control[1])

        plan = make_plan(sample_clients(cfg.seed, t, self.num_clients, cfg.sampled_per_round), self.host, w.size)
        mine = plan.of_rank(w.rank)
        payloads = self._down(t, plan, "down")
        if w.is_server:
            self._write_pending(ended=(times.start_wall, times.start_cpu))  # while the workers train

        start = time.perf_counter()
        sizes = _sizes(self.algo.up_numel_of, mine) if isinstance(self.algo.up, Gathered) else None
        uplink = UplinkBuffer(self.algo.up, self.algo.up_numel(), len(mine), sizes)
        rows = np.empty((len(mine), len(META_COLUMNS) + len(self.metric_names)), dtype=np.float64)
        for i, (k, payload) in enumerate(zip(mine, payloads, strict=True)):
            update = self.algo.client_update(self._client(k, t), payload)
            uplink.add(update)
            rows[i] = (
                k,
                update.weight,
                self.client_data[k].y_train.shape[0],
                *(update.metrics[m] for m in self.metric_names),
            )
        times.compute = time.perf_counter() - start

        client_rows = self._gather_rows(plan, rows, "metrics")
        aggregate_input = self._up(plan, uplink, client_rows[:, 1] if w.is_server else None)
        algorithm_metrics: dict[str, float] = {}
        if w.is_server:
            start = time.perf_counter()
            algorithm_metrics = self.algo.aggregate(t, aggregate_input)
            times.aggregate = time.perf_counter() - start

        state_rows = None
        if not self.layout.empty:  # every trained client's state, of its group's size: no padding
            sizes = self.layout.numels(plan.order)
            packed = self.store.pack_flat(mine) if w.is_worker else np.empty(0, np.float32)
            state_rows = np.empty(int(sizes.sum()), dtype=np.float32) if w.is_server else None
            w.gatherv(packed, self._counts(plan, sizes), state_rows, "state")

        evaluated = self._evaluate(t) if self._eval_due(t) else (None, ())
        ledgers = w.gather_rows(np.concatenate([w.ledger.as_row(), times.row()]), "ledger")
        w.ledger.reset()  # messages before the first round (setup, restore) count in that round
        if w.is_server:
            self._keep_record(t, plan, times, client_rows, algorithm_metrics, state_rows, evaluated, ledgers)
        return 0

    def _eval_due(self, t: int) -> bool:
        return (t + 1) % self.cfg.eval_every == 0 or t == self.cfg.rounds - 1

    def _snapshot_due(self, t: int) -> bool:
        every = self.cfg.state_every
        return t == self.cfg.rounds - 1 or (every > 0 and (t + 1) % every == 0)

    def _evaluate(self, t: int) -> tuple[np.ndarray | None, tuple[str, ...]]:
        """Every client's test loss and accuracy with the model it would use (rows of ``EVAL_COLUMNS``),
        and the names of the extra columns that follow.

        After the last round with ``finetune_epochs``, each client then fine-tunes that model on its
        training split and is evaluated again (``FINETUNE_COLUMNS``); its state is not changed. An
        algorithm with a global model beside the personal ones (``load_global_for_eval``) also has
        that model evaluated on every client (``GLOBAL_COLUMNS``). Every evaluation is the algorithm's
        ``evaluate_client`` on the model of the client's architecture group.
        """
        algo = self.algo
        finetune = self.cfg.finetune_epochs if t == self.cfg.rounds - 1 else 0
        extra = (FINETUNE_COLUMNS if finetune else ()) + (GLOBAL_COLUMNS if algo.has_global_model() else ())
        rows: dict[int, list[float]] = {}
        for plan in self._eval_blocks():
            mine = plan.of_rank(self.world.rank)
            payloads = self._down(t, plan, "eval_down") if algo.eval_payload else [None] * len(mine)
            for k, payload in zip(mine, payloads, strict=True):
                client = self._client(k, t)
                algo.load_for_eval(client, payload)
                row = [k, client.data.y_test.shape[0], *algo.evaluate_client(client)]
                if finetune:
                    client.generator = client_generator(self.cfg.seed, k, self.cfg.rounds)  # a round never trained
                    algo.local_sgd(client, epochs=finetune)
                    row += algo.evaluate_client(client)
                if algo.has_global_model():
                    algo.load_global_for_eval(client, payload)
                    row += algo.evaluate_client(client)
                rows[k] = row
        width = len(EVAL_COLUMNS) + len(extra)
        table = np.array([rows[k] for k in self.hosted], dtype=np.float64).reshape(len(self.hosted), width)
        return self._gather_rows(self.all_clients, table, "eval_metrics"), extra

    def _eval_blocks(self) -> list[Plan]:
        """Every client, in blocks whose per-client evaluation payloads (PerClient) take at most
        ``EVAL_BLOCK_BYTES`` together: the server never builds N models' worth at once. One block otherwise."""
        down = self.algo.down
        if not isinstance(down, PerClient) or not self.algo.eval_payload:
            return [self.all_clients]
        itemsize = WIRE_DTYPES[down.dtype].itemsize
        largest = max(self.algo.down_numel_of(k) for k in range(self.num_clients)) * itemsize
        block = max(1, EVAL_BLOCK_BYTES // max(largest, 1))
        clients = np.arange(self.num_clients)
        return [make_plan(clients[i : i + block], self.host, self.world.size) for i in range(0, len(clients), block)]

    # -- the server's records -------------------------------------------------------------
    def _keep_record(self, t, plan, times, client_rows, algorithm_metrics, state_rows, evaluated, ledgers) -> None:
        """Summarise round t and check it; keep it to write during the next round (or stop on NaN)."""
        scalars, clients, comm, ranks = summarise(
            t, self.num_clients, self.metric_names, client_rows, evaluated, ledgers, self.world.workers
        )
        scalars.update({k: float(v) for k, v in algorithm_metrics.items()})
        server_state = {k: v.detach().cpu().numpy().copy() for k, v in self.algo.server_state().items()}
        bad = non_finite(scalars, server_state)
        if bad:
            self.stop_code = EXIT_DIVERGED
            self.divergence = DivergenceError(
                f"round {t + 1}: {', '.join(bad)} became NaN or infinite; stopped, "
                f"the file keeps the {t} completed round(s)"
            )
            return
        state = self.layout.split(plan.order, state_rows) if state_rows is not None else {}
        snapshot = None
        if self._snapshot_due(t):
            snapshot = {k: v.detach().cpu().numpy().copy() for k, v in self.algo.global_state().items()}
        self.pending = RoundRecord(
            t,
            scalars,
            clients,
            comm,
            ranks,
            server_state,
            state,
            snapshot,
            (times.start_wall, times.start_cpu),
        )

    def _write_pending(self, ended: tuple[float, float]) -> None:
        """Write and commit the round kept by ``_keep_record``, if any, and show it."""
        if self.pending is None:
            return
        self.last_metrics = write(self.writer, self.pending, ended)
        self.pending = None
        self.progress.update(self.last_metrics)

    # -- the whole run --------------------------------------------------------------------
    def run(self) -> int:
        """Run the remaining rounds; return the exit code every rank agrees on (0, or 3 on divergence)."""
        self.world.barrier()  # start-up (data, models) is not part of round 1's timings
        for t in range(self.start_round, self.cfg.rounds):
            if self._round(t):
                break
        final = np.array([self.cfg.rounds, self.stop_code], dtype=np.int64)
        self.world.broadcast(final, "control")
        if self.world.is_server:
            self._write_pending(ended=(time.perf_counter(), time.process_time()))
        self.progress.close()
        code = int(final[1])
        if self.writer is not None:
            self.writer.close("diverged" if code == EXIT_DIVERGED else "completed")
        return code
