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
    Setup,
    WeightedMean,
    WeightedSum,
    resolve,
)
from ..algorithms.base import WIRE_DTYPES
from ..algorithms.training import evaluate
from ..comm import FIELDS, LABELS, World
from ..config import RunConfig
from ..data import ClientData, load_federated
from ..errors import DivergenceError
from ..models import build_model
from ..store import RunWriter
from .client_store import ClientStore
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
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, self.data.input_shape, self.data.num_classes).to(self.device)
        cls, params = resolve(cfg.algorithm)
        self.algo: Algorithm = cls(
            params, Setup(model, self.device, cfg.train, self.num_clients, self.data.num_classes, cfg.seed)
        )
        self.state_spec = self.algo.client_state_spec()
        self.metric_names = self.algo.client_metrics
        self.stop_code = 0
        self.start_round = 0
        self.writer: RunWriter | None = None
        self.pending: RoundRecord | None = None
        if world.is_worker:
            self.store = ClientStore(self.state_spec, self.hosted, self.algo.init_client_state)
            self.client_data = {k: _to_device(self.data.client(k), self.device) for k in self.hosted}
        self.algo.setup.label_distribution = self._label_distribution()
        if world.is_server:
            self.algo.init_server()
        if resume:
            self._restore()
        elif world.is_server:
            self.writer = self._create_file()
        self.progress = Progress(cfg.rounds, self.start_round, enabled=show_progress and world.is_server)

    def _label_distribution(self) -> torch.Tensor:
        """Class frequencies of all training data: each worker counts its clients', one Reduce, one Bcast."""
        counts = np.zeros(self.data.num_classes, dtype=np.float64)
        if self.world.is_worker:
            for k in self.hosted:
                counts += np.bincount(self.client_data[k].y_train.cpu().numpy(), minlength=len(counts))
        self.world.reduce_sum(counts, "setup")
        self.world.broadcast(counts, "setup")
        return torch.from_numpy(counts / counts.sum()).float()

    # -- the file -------------------------------------------------------------------------
    def _create_file(self) -> RunWriter:
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
            "label_histograms": data.label_histograms(),
            "host_rank": self.host,
        }

        def init_state(k: int) -> dict[str, np.ndarray]:
            return {name: v.numpy() for name, v in self.algo.init_client_state(k).items()}

        return RunWriter.create(self.cfg.output_path, attrs, partition, self.state_spec, init_state, self.num_clients)

    def _restore(self) -> None:
        """Continue a run file: server state from its checkpoint, client states scattered to their hosts."""
        w = self.world
        done = np.zeros(1, dtype=np.int64)
        if w.is_server:
            plan = {"rounds_planned": self.cfg.rounds, "config": self.cfg.to_yaml()}
            self.writer, done[0] = RunWriter.reopen(self.cfg.output_path, plan)
        w.broadcast(done, "restore")
        self.start_round = int(done[0])
        if self.start_round == 0:
            return
        tables: dict[str, np.ndarray] = {}
        if w.is_server:
            server, tables = self.writer.read_checkpoint(self.start_round)
            self.algo.load_server_state({k: torch.from_numpy(v) for k, v in server.items()})
        if not self.state_spec:
            return
        plan, numel = self.all_clients, sum(self.state_spec.values())
        send = None
        if w.is_server:
            send = np.concatenate([tables[name] for name in self.state_spec], axis=1)[plan.order]
            self.writer.pend_all(np.asarray(plan.order), {n: tables[n][plan.order] for n in self.state_spec})
        recv = np.empty((len(self.hosted), numel), dtype=np.float32)
        w.scatterv(send, [c * numel for c in plan.per_rank], recv, "restore")
        if w.is_worker:
            self.store.unpack(self.hosted, recv)

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
        send = (
            _wire_array(self.algo.downlink(t, plan.order), down.dtype, (len(plan.order), n))
            if self.world.is_server
            else None
        )
        recv = np.empty((len(mine), n), dtype=wire)
        size = n * wire.itemsize if down.dtype != torch.float32 else n  # elements of the (raw) buffers
        self.world.scatterv(None if send is None else _raw(send), [c * size for c in plan.per_rank], _raw(recv), label)
        return [torch.from_numpy(row) for row in recv]

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
            wire = uplink.buf.dtype
            recv = np.empty((len(plan.order), n), dtype=wire) if w.is_server else None
            size = n * wire.itemsize if up.dtype != torch.float32 else n
            w.gatherv(_raw(uplink.buf), [c * size for c in plan.per_rank], None if recv is None else _raw(recv), "up")
            if w.is_server:
                return Collected(plan.order, torch.from_numpy(recv), torch.from_numpy(weights.astype(np.float32)))
        return None

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
        uplink = UplinkBuffer(self.algo.up, self.algo.up_numel(), len(mine))
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
        if self.state_spec:
            packed = self.store.pack(mine) if w.is_worker else np.empty((0, self.store_numel), np.float32)
            state_rows = self._gather_rows(plan, packed, "state")

        evaluated = self._evaluate(t) if self._eval_due(t) else (None, ())
        ledgers = w.gather_rows(np.concatenate([w.ledger.as_row(), times.row()]), "ledger")
        w.ledger.reset()  # messages before the first round (setup, restore) count in that round
        if w.is_server:
            self._keep_record(t, plan, times, client_rows, algorithm_metrics, state_rows, evaluated, ledgers)
        return 0

    @property
    def store_numel(self) -> int:
        return sum(self.state_spec.values())

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
        that model evaluated on every client (``GLOBAL_COLUMNS``).
        """
        plan, model, algo = self.all_clients, self.algo.setup.model, self.algo
        finetune = self.cfg.finetune_epochs if t == self.cfg.rounds - 1 else 0
        extra = (FINETUNE_COLUMNS if finetune else ()) + (GLOBAL_COLUMNS if algo.has_global_model() else ())
        payloads = self._down(t, plan, "eval_down")
        rows = np.empty((len(self.hosted), len(EVAL_COLUMNS) + len(extra)))
        for i, (k, payload) in enumerate(zip(self.hosted, payloads, strict=True)):
            client = self._client(k, t)
            algo.load_for_eval(client, payload)
            row = [k, client.data.y_test.shape[0], *evaluate(model, *client.test)]
            if finetune:
                client.generator = client_generator(self.cfg.seed, k, self.cfg.rounds)  # a round never trained
                algo.local_sgd(client, epochs=finetune)
                row += evaluate(model, *client.test)
            if algo.has_global_model():
                algo.load_global_for_eval(client, payload)
                row += evaluate(model, *client.test)
            rows[i] = row
        return self._gather_rows(plan, rows, "eval_metrics"), extra

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
        offsets = np.cumsum([0, *self.state_spec.values()])
        state = {name: state_rows[:, offsets[i] : offsets[i + 1]] for i, name in enumerate(self.state_spec)}
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
            plan.order,
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
