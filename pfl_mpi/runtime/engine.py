"""The round loop every rank runs, each in its role: the server (rank 0) and the workers.

One round, in the order the messages go (labels of the ledger in brackets):

1. [control]  Bcast of (round, status): the server says continue, or stop with an exit code.
2. [down]     the algorithm's downlink: Bcast of one payload, or Scatterv of one per client.
3.            each worker trains its sampled clients (``client_updates``: one after another, or in blocks of
              ``train.client_batch``).
4. [metrics]  Gatherv of each sampled client's (id, weight, samples, metrics).
5. [up]       the algorithm's uplink: one Reduce of the pre-summed weighted payloads, or Gatherv.
6.            the server aggregates (``aggregate``).
7. [state]    Gatherv of the personal state of the clients that trained (for the checkpoint).
8. [eval_down, eval_metrics] on evaluation rounds: every client's payload down, its test metrics up
              (``evaluation.Evaluator``).
9. [ledger]   Gather of every rank's message counters and timings; the server writes the round
              (``record.Recorder``) while the workers train the next one.

The messages of steps 2 and 5 are the algorithm's declarations, moved by ``wire.Transport``. Everything
that is random derives from (seed, client, round); placement only decides where things are computed,
never what.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..algorithms import Algorithm, Client
from ..comm import World
from ..config import RunConfig
from ..data import ClientData, load_federated
from ..errors import EXIT_DIVERGED, AgreedConfigError, ConfigError
from ..network import simulated_network
from ..seeding import client_generator
from ..store import RunWriter
from ..store.layout import StateLayout
from ..store.nested import unflatten_state
from ..store.run_file import close_run_file, create_run_file, reopen_run_file
from ..training.client_batch import batching_record
from ..wire.plan import make_plan
from ..wire.protocol import training_bytes
from ..wire.transport import Transport, counts_per_rank
from .build import build_algorithm
from .client_store import ClientStore
from .device import select_device, set_threads
from .evaluation import Evaluator
from .novel import NovelServing
from .placement import held_out, place_clients, sample_clients
from .progress import Progress
from .record import META_COLUMNS, Recorder, RoundArrivals
from .restore import scatter_client_states


def _to_device(data: ClientData, device: torch.device) -> ClientData:
    return ClientData(*(None if t is None else t.to(device) for t in vars(data).values()))  # validation too


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
        self.novel, self.training = held_out(cfg, self.num_clients)  # data.novel_clients: never sampled
        self.host = place_clients(self.data.train_sizes, world.workers)
        self.all_clients = make_plan(np.arange(self.num_clients), self.host, world.size)
        self.hosted = self.all_clients.of_rank(world.rank)
        self.device = select_device(cfg.device, world.local_rank) if world.is_worker else torch.device("cpu")
        self.algo: Algorithm = build_algorithm(cfg, self.data, self.device, world.local_size)
        self.transport = Transport(world, self.algo)
        groups = self.algo.setup.groups
        self.layout = StateLayout(self.algo.state_specs(), groups)  # each client's state, by architecture group
        self.metric_names = self.algo.client_metrics
        self.stop_code, self.start_round = 0, 0
        self.divergence: Exception | None = None
        self.writer: RunWriter | None = None
        if world.is_worker:
            self.store = ClientStore(self.layout.specs, self.hosted, self.algo.initial_client_state, groups)
        self.client_data = self._load_hosted_clients()
        histograms = self._label_histograms()
        self.algo.setup.label_distribution = self._label_distribution(histograms)
        if world.is_server:
            self.algo.init_server()
        if resume:
            self._restore()
        elif world.is_server:
            self.writer = self._create_file(histograms)
        self.network = simulated_network(  # None unless network.enabled
            cfg,
            self.data.train_sizes,
            lambda c: training_bytes(self.algo, c),
            functools.partial(sample_clients, pool=self.training),
            self.start_round,
        )
        self.progress = Progress(cfg.rounds, self.start_round, enabled=show_progress and world.is_server)
        self.evaluate = Evaluator(
            self.algo,
            self.transport,
            self.host,
            [k for k in self.hosted if k not in set(self.novel.tolist())],
            self._client,
            cfg.seed,
            cfg.rounds,
            cfg.finetune_epochs,
            cfg.data.eval_splits,  # data.eval_on
            clients=self.training,  # the novel clients are served and scored apart (self.serve_novel)
        )
        self.serve_novel = None
        if len(self.novel):
            self.serve_novel = NovelServing(self.algo, self.transport, self.host, self._client, cfg, self.novel)
        if world.is_server:
            self.recorder = Recorder(
                self.writer, self.algo, self.layout, self.metric_names, world.workers, self.progress
            )

    def _load_hosted_clients(self) -> dict[int, ClientData]:
        """This worker's clients, on its device; the ranks agree first, so that bad samples only one worker reads
        (images of another size, ...) end every rank with its one line (``AgreedConfigError``)."""
        hosted, failure = {}, None
        try:
            hosted = self.data.clients(self.hosted) if self.world.is_worker else {}  # in order; the cache is emptied
        except ConfigError as err:
            failure = (err.key, err.message)
        agreed = self.world.agree(None if failure is None else "\n".join(failure))
        if agreed is not None:
            rank, text = agreed
            raise AgreedConfigError(*text.split("\n", 1), rank)
        return {k: _to_device(hosted[k], self.device) for k in self.hosted}

    @property
    def last_metrics(self) -> dict[str, float]:
        """The last round written (its scalars)."""
        return self.recorder.last_metrics

    def _label_histograms(self) -> np.ndarray | None:
        """Training samples per class of every client, int64 [N, C], on the server (None elsewhere).

        Each worker counts the clients it hosts, one Gatherv: no rank loads (or, for synthetic data,
        generates) a client it does not host. Real-valued targets (``data.targets: values``) have no classes:
        [N, 0], without a message.
        """
        if self.data.targets == "values":
            return np.zeros((self.num_clients, 0), dtype=np.int64) if self.world.is_server else None
        c = self.data.num_classes
        mine = np.zeros((len(self.hosted), c), dtype=np.int64)
        for i, k in enumerate(self.hosted if self.world.is_worker else ()):
            mine[i] = np.bincount(self.client_data[k].y_train.cpu().numpy(), minlength=c)
        rows = self.transport.gather_rows(self.all_clients, mine, "setup")
        if rows is None:
            return None
        histograms = np.empty_like(rows)
        histograms[self.all_clients.order] = rows
        return histograms

    def _label_distribution(self, histograms: np.ndarray | None) -> torch.Tensor:
        """Class frequencies of all training data: summed on the server, one Bcast (none for real values)."""
        if self.data.targets == "values":
            return torch.zeros(0)
        counts = np.zeros(self.data.num_classes, dtype=np.float64)
        if histograms is not None:
            counts[:] = histograms[self.training].sum(axis=0)  # the novel clients' data stay unseen
        self.world.broadcast(counts, "setup")
        return torch.from_numpy(counts / counts.sum()).float()

    # -- the file -------------------------------------------------------------------------
    def _create_file(self, histograms: np.ndarray) -> RunWriter:
        algo, batching = self.algo, batching_record(self.algo, self.data.input_shape, self.data.x_dtype)
        return create_run_file(
            self.cfg, self.world, self.data, histograms, self.host, self.layout, algo.initial_client_state, batching
        )

    def _restore(self) -> None:
        """Continue a run file: server state from its checkpoint, client states back on their hosts."""
        w = self.world
        done = np.zeros(1, dtype=np.int64)
        if w.is_server:
            self.writer, done[0] = reopen_run_file(self.cfg)
        w.broadcast(done, "restore")
        self.start_round = int(done[0])
        if self.start_round == 0:
            return
        tables = {}
        if w.is_server:
            server, tables = self.writer.read_checkpoint(self.start_round)
            self.algo.load_server_state(unflatten_state(server))
            self.writer.carry_over(self.start_round)
        if not self.layout.empty:
            scatter_client_states(w, self.layout, tables, self.host, self.store if w.is_worker else None)

    def _client(self, k: int, t: int) -> Client:
        return Client(k, t, self.client_data[k], self.store.views(k), client_generator(self.cfg.seed, k, t))

    # -- one round ------------------------------------------------------------------------
    def _round(self, t: int) -> int:
        w, cfg, times = self.world, self.cfg, RoundTimes()
        control = np.array([t, self.stop_code], dtype=np.int64)
        w.broadcast(control, "control")
        if control[1]:
            return int(control[1])

        net = self.network.round(t) if self.network else None  # over-selects; keeps the clients that arrive
        pool = self.training  # every client but the novel ones
        sampled = net.kept if net else sample_clients(cfg.seed, t, self.num_clients, cfg.sampled_per_round, pool)
        plan = make_plan(sampled, self.host, w.size)
        mine = plan.of_rank(w.rank)
        payloads = self.transport.down(t, plan, "train") if plan.order else []  # none: nobody arrived
        if w.is_server:
            self.recorder.flush(ended=(times.start_wall, times.start_cpu))  # while the workers train

        start = time.perf_counter()
        uplink = self.transport.uplink_buffer(mine)
        rows = np.empty((len(mine), len(META_COLUMNS) + len(self.metric_names)), dtype=np.float64)
        updates = self.algo.client_updates([self._client(k, t) for k in mine], payloads)  # blocks: client_batch
        for i, (k, update) in enumerate(zip(mine, updates, strict=True)):
            uplink.add(update)
            num_train = self.client_data[k].y_train.shape[0]
            rows[i] = (k, update.weight, num_train, *(update.metrics[m] for m in self.metric_names))
        times.compute = time.perf_counter() - start

        client_rows = self.transport.gather_rows(plan, rows, "metrics")
        aggregate_input = self.transport.up(plan, uplink, client_rows[:, 1] if w.is_server else None)
        algorithm_metrics: dict[str, float] = {}
        if w.is_server and plan.order:
            start = time.perf_counter()
            algorithm_metrics = self.algo.aggregate(t, aggregate_input)
            times.aggregate = time.perf_counter() - start

        state_rows = None
        if not self.layout.empty:  # every trained client's state, of its group's size: no padding
            sizes = self.layout.numels(plan.order)
            packed = self.store.pack_flat(mine) if w.is_worker else np.empty(0, np.float32)
            state_rows = np.empty(int(sizes.sum()), dtype=np.float32) if w.is_server else None
            w.gatherv(packed, counts_per_rank(plan, sizes), state_rows, "state")

        evaluated = self.evaluate(t) if self._eval_due(t) else (None, ())
        novel = self.serve_novel(t) if self.serve_novel and t == cfg.rounds - 1 else None
        ledgers = w.gather_rows(np.concatenate([w.ledger.as_row(), times.row()]), "ledger")
        w.ledger.reset()  # messages before the first round (setup, restore) count in that round
        if w.is_server:
            self.divergence = self.recorder.keep(
                RoundArrivals(
                    t, plan.order, (times.start_wall, times.start_cpu), client_rows, algorithm_metrics, state_rows,
                    evaluated, ledgers, snapshot=self._snapshot_due(t), network=net, novel=novel,
                )
            )  # fmt: skip
            if self.divergence is not None:
                self.stop_code = EXIT_DIVERGED
        return 0

    def _eval_due(self, t: int) -> bool:
        return (t + 1) % self.cfg.eval_every == 0 or t == self.cfg.rounds - 1

    def _snapshot_due(self, t: int) -> bool:
        every = self.cfg.state_every
        return t == self.cfg.rounds - 1 or (every > 0 and (t + 1) % every == 0)

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
            self.recorder.flush(ended=(time.perf_counter(), time.process_time()))
        self.progress.close()
        code = int(final[1])
        close_run_file(self.writer, code)  # status: completed, diverged, interrupted (SIGTERM)
        return code
