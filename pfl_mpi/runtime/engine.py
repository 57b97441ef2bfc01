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

import math
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
from ..algorithms.training import evaluate
from ..comm import ALGORITHM_LABELS, FIELDS, LABELS, World
from ..config import RunConfig
from ..data import ClientData, load_federated
from ..errors import DivergenceError
from ..models import build_model
from ..store import RunWriter
from .client_store import ClientStore
from .device import select_device, set_threads
from .placement import Plan, make_plan, place_clients, sample_clients
from .progress import Progress
from .seeding import client_generator

EXIT_DIVERGED = 3
RANK_FIELDS = ("compute_seconds", "aggregate_seconds", "cpu_seconds", "wall_seconds")


def _to_device(data: ClientData, device: torch.device) -> ClientData:
    return ClientData(*(t.to(device) for t in (data.x_train, data.y_train, data.x_test, data.y_test)))


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
        if world.is_worker:
            self.store = ClientStore(self.state_spec, self.hosted, self.algo.init_client_state)
            self.client_data = {k: _to_device(self.data.client(k), self.device) for k in self.hosted}
        if world.is_server:
            self.algo.init_server()
        if resume:
            self._restore()
        elif world.is_server:
            self.writer = self._create_file()
        self.progress = Progress(cfg.rounds, self.start_round, enabled=show_progress and world.is_server)

    # -- the file -------------------------------------------------------------------------
    def _create_file(self) -> RunWriter:
        import h5py
        import mpi4py

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
                "mpi4py": mpi4py.__version__,
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
        w.bcast(done, "restore")
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
        """The downlink payload of each of this rank's clients in ``plan``."""
        mine, down = plan.of_rank(self.world.rank), self.algo.down
        if down is None:
            return [None] * len(mine)
        n = self.algo.down_numel()
        if isinstance(down, Broadcast):
            buf = (
                self.algo.downlink(t, plan.order).detach().cpu().numpy().astype(np.float32, copy=True)
                if self.world.is_server
                else np.empty(n, dtype=np.float32)
            )
            self.world.bcast(buf, label)
            payload = torch.from_numpy(buf)
            return [payload] * len(mine)
        assert isinstance(down, PerClient)
        send = (
            np.ascontiguousarray(self.algo.downlink(t, plan.order).detach().cpu().numpy(), dtype=np.float32)
            if self.world.is_server
            else None
        )
        recv = np.empty((len(mine), n), dtype=np.float32)
        self.world.scatterv(send, [c * n for c in plan.per_rank], recv, label)
        return [torch.from_numpy(row) for row in recv]

    def _up(self, plan: Plan, updates: list, weights: np.ndarray | None) -> WeightedMean | Collected | None:
        """Move the clients' payloads up; the server gets what its ``aggregate`` takes."""
        up, n, w = self.algo.up, self.algo.up_numel(), self.world
        if up is None:
            return None
        if isinstance(up, WeightedSum):
            buf = np.zeros(n + 1, dtype=np.float32)  # sum(w_k p_k) and sum(w_k), pre-summed on this rank
            acc = torch.from_numpy(buf)
            for u in updates:
                acc[:n].add_(u.payload.detach().cpu(), alpha=u.weight)
                acc[n] += u.weight
            w.reduce_sum(buf, "up")
            if not w.is_server:
                return None
            return WeightedMean(torch.from_numpy(buf[:n] / buf[n]), float(buf[n]), len(plan.order))
        assert isinstance(up, Gathered)
        send = (
            np.stack([u.payload.detach().cpu().numpy() for u in updates]).astype(np.float32)
            if updates
            else np.empty((0, n), dtype=np.float32)
        )
        recv = np.empty((len(plan.order), n), dtype=np.float32) if w.is_server else None
        w.gatherv(send, [c * n for c in plan.per_rank], recv, "up")
        if not w.is_server:
            return None
        return Collected(plan.order, torch.from_numpy(recv), torch.from_numpy(weights.astype(np.float32)))

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
        w.ledger.reset()
        control = np.array([t, self.stop_code], dtype=np.int64)
        w.bcast(control, "control")
        if control[1]:
            return int(control[1])

        plan = make_plan(sample_clients(cfg.seed, t, self.num_clients, cfg.sampled_per_round), self.host, w.size)
        mine = plan.of_rank(w.rank)
        payloads = self._down(t, plan, "down")

        start, updates = time.perf_counter(), []
        for k, payload in zip(mine, payloads, strict=True):
            updates.append(self.algo.client_update(self._client(k, t), payload))
        times.compute = time.perf_counter() - start

        rows = np.array(
            [
                [k, u.weight, self.client_data[k].y_train.shape[0], *(u.metrics[m] for m in self.metric_names)]
                for k, u in zip(mine, updates, strict=True)
            ],
            dtype=np.float64,
        ).reshape(len(mine), 3 + len(self.metric_names))
        client_rows = self._gather_rows(plan, rows, "metrics")
        aggregate_input = self._up(plan, updates, client_rows[:, 1] if w.is_server else None)

        round_metrics: dict[str, float] = {}
        if w.is_server:
            start = time.perf_counter()
            round_metrics = self.algo.aggregate(t, aggregate_input)
            times.aggregate = time.perf_counter() - start

        state_rows = None
        if self.state_spec:
            packed = self.store.pack(mine) if w.is_worker else np.empty((0, self.store_numel), np.float32)
            state_rows = self._gather_rows(plan, packed, "state")

        evaluated = self._evaluate(t) if self._eval_due(t) else None
        ledgers = w.gather_rows(np.concatenate([w.ledger.as_row(), times.row()]), "ledger")
        if w.is_server:
            self._record(t, plan, client_rows, round_metrics, state_rows, evaluated, ledgers)
        return 0

    @property
    def store_numel(self) -> int:
        return sum(self.state_spec.values())

    def _eval_due(self, t: int) -> bool:
        return (t + 1) % self.cfg.eval_every == 0 or t == self.cfg.rounds - 1

    def _evaluate(self, t: int) -> np.ndarray | None:
        """Every client's test loss and accuracy with the model it would use; rows [id, n_test, loss, acc]."""
        plan = self.all_clients
        payloads = self._down(t, plan, "eval_down")
        rows = np.empty((len(self.hosted), 4), dtype=np.float64)
        for i, (k, payload) in enumerate(zip(self.hosted, payloads, strict=True)):
            client = self._client(k, t)
            self.algo.load_for_eval(client, payload)
            loss, acc = evaluate(self.algo.setup.model, client.data.x_test, client.data.y_test)
            rows[i] = (k, client.data.y_test.shape[0], loss, acc)
        return self._gather_rows(plan, rows, "eval_metrics")

    # -- the server's record of a round ---------------------------------------------------
    def _record(self, t, plan, client_rows, round_metrics, state_rows, evaluated, ledgers) -> None:
        n, names = self.num_clients, self.metric_names
        ids = client_rows[:, 0].astype(np.int64)
        clients = {"participated": np.zeros(n, dtype=bool)}
        clients["participated"][ids] = True
        for j, name in enumerate(names):
            clients[name] = np.full(n, np.nan)
            clients[name][ids] = client_rows[:, 3 + j]
        samples = client_rows[:, 2]
        scalars = {
            "round": t,
            "num_sampled": len(ids),
            "world_size": self.world.size,
            "train_loss": float(np.sum(samples * client_rows[:, 3]) / np.sum(samples)),
        }
        clients["test_loss"], clients["test_acc"] = np.full(n, np.nan), np.full(n, np.nan)
        if evaluated is not None:
            eids, n_test = evaluated[:, 0].astype(np.int64), evaluated[:, 1]
            clients["test_loss"][eids], clients["test_acc"][eids] = evaluated[:, 2], evaluated[:, 3]
            scalars.update(
                test_loss=float(np.sum(n_test * evaluated[:, 2]) / np.sum(n_test)),
                test_acc=float(np.sum(n_test * evaluated[:, 3]) / np.sum(n_test)),
                test_acc_mean=float(np.mean(evaluated[:, 3])),
                test_acc_std=float(np.std(evaluated[:, 3])),
            )
        table = ledgers[:, : len(LABELS) * len(FIELDS)].reshape(-1, len(LABELS), len(FIELDS))
        per_rank = ledgers[:, len(LABELS) * len(FIELDS) :]
        sent, received, seconds = (FIELDS.index(f) for f in ("bytes_sent", "bytes_received", "seconds"))
        algo_rows = [LABELS.index(label) for label in ALGORITHM_LABELS]
        workers = self.world.workers
        scalars.update(
            bytes_down=float(table[workers, LABELS.index("down"), received].sum()) if self.world.size > 1 else 0.0,
            bytes_up=float(table[workers, LABELS.index("up"), sent].sum()) if self.world.size > 1 else 0.0,
            bytes_other=float(np.delete(table[:, :, sent], algo_rows, axis=1).sum()),
            seconds_compute=float(per_rank[workers, 0].max()),
            seconds_aggregate=float(per_rank[0, 1]),
            seconds_comm=float(table[0, :, seconds].sum()),
            seconds_wall=float(per_rank[0, 3]),
            server_cpu=float(per_rank[0, 2] / max(per_rank[0, 3], 1e-9)),
            **{k: float(v) for k, v in round_metrics.items()},
        )
        self._check_finite(t, scalars, client_rows)
        if self.stop_code:
            return
        start = time.perf_counter()
        writer = self.writer
        writer.append_round(
            t,
            scalars,
            clients,
            {f: table[:, :, i] for i, f in enumerate(FIELDS)},
            {f: per_rank[:, i] for i, f in enumerate(RANK_FIELDS)},
        )
        server_state = {k: v.detach().cpu().numpy() for k, v in self.algo.server_state().items()}
        rows = {}
        offset = 0
        for name, numel in self.state_spec.items():
            rows[name] = state_rows[:, offset : offset + numel]
            offset += numel
        writer.checkpoint(t, server_state, plan.order, rows)
        if self._snapshot_due(t):
            writer.snapshot(t, {k: v.detach().cpu().numpy() for k, v in self.algo.global_state().items()})
        scalars["seconds_io"] = time.perf_counter() - start
        writer.set_round_value(t, "seconds_io", scalars["seconds_io"])
        writer.commit(t)
        self.last_metrics = scalars
        self.progress.update(scalars)

    def _snapshot_due(self, t: int) -> bool:
        every = self.cfg.state_every
        return t == self.cfg.rounds - 1 or (every > 0 and (t + 1) % every == 0)

    def _check_finite(self, t: int, scalars: dict[str, float], client_rows: np.ndarray) -> None:
        bad = [k for k in ("train_loss", "test_loss") if not math.isfinite(scalars.get(k, 0.0))]
        bad += [
            f"server state {k}"
            for k, v in self.algo.server_state().items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())
        ]
        if bad:
            self.stop_code = EXIT_DIVERGED
            self.divergence = DivergenceError(
                f"round {t + 1}: {', '.join(bad)} became NaN or infinite; stopped, "
                f"the file keeps the {t} completed round(s)"
            )

    # -- the whole run --------------------------------------------------------------------
    def run(self) -> int:
        """Run the remaining rounds; return the exit code every rank agrees on (0, or 3 on divergence)."""
        code = 0
        self.world.barrier()  # start-up (data, models) is not part of round 1's timings
        for t in range(self.start_round, self.cfg.rounds):
            code = self._round(t)
            if code:
                break
        final = np.array([self.cfg.rounds, self.stop_code], dtype=np.int64)
        self.world.bcast(final, "control")
        self.progress.close()
        code = int(final[1])
        if self.writer is not None:
            self.writer.close("diverged" if code == EXIT_DIVERGED else "completed")
        return code
