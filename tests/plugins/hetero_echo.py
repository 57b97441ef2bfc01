"""Local training through the server, with heterogeneous clients: exercises every per-client size path.

Each client's model (its architecture group's size) is client state *and* kept by the server. The server
sends each sampled client its stored model (PerClient, ``down_numel_of`` = the group's size); the client
trains it, keeps it and sends it back followed by its training labels (Gathered, ``up_numel_of`` = group
size + training samples: ragged by group and by client). The server stores the models and reports the sum
of the labels it received. Every client therefore trains exactly as under ``local`` with its group's
architecture, which the tests check.
"""

from __future__ import annotations

import torch

from pfl_mpi.algorithms import Algorithm, Client, Collected, Gathered, PerClient, Phase, Setup, Update, register
from pfl_mpi.models import ParamLayout


@register
class HeteroEcho(Algorithm):
    name = "hetero_echo"
    heterogeneous = True
    down = PerClient()
    eval_down = PerClient()
    up = Gathered()

    def __init__(self, params, setup: Setup):
        super().__init__(params, setup)
        self.layouts = [ParamLayout(m, [n for n, _ in m.named_parameters()]) for m in setup.models]
        self.initial = [layout.flatten(m) for layout, m in zip(self.layouts, setup.models, strict=True)]

    def _layout(self, client: int) -> ParamLayout:
        return self.layouts[self.setup.group_of(client)]

    def down_numel_of(self, client: int) -> int:
        return self._layout(client).numel

    def up_numel_of(self, client: int) -> int:
        return self._layout(client).numel + int(self.setup.train_sizes[client])

    def client_state_spec(self, group: int) -> dict[str, int]:
        return {"model": self.layouts[group].numel}

    def init_client_state(self, client_id: int) -> dict[str, torch.Tensor]:
        return {"model": self.initial[self.setup.group_of(client_id)].clone()}

    def init_server(self) -> None:
        self.models = [self.initial[self.setup.group_of(k)].clone() for k in range(self.setup.num_clients)]

    def downlink(self, round: int, clients: list[int], phase: Phase) -> list[torch.Tensor]:
        return [self.models[k] for k in clients]

    def aggregate(self, round: int, up: Collected) -> dict[str, float]:
        labels = 0.0
        for k, row in zip(up.clients, up.rows, strict=True):
            numel = self._layout(k).numel
            self.models[k] = row[:numel].clone()
            labels += float(row[numel:].sum())
        return {"label_sum": labels}

    def server_state(self) -> dict[str, torch.Tensor]:
        return {f"group{g}": torch.stack(self._of_group(g)) for g in range(self.setup.num_groups)}

    def _of_group(self, g: int) -> list[torch.Tensor]:
        return [m for k, m in enumerate(self.models) if self.setup.group_of(k) == g]

    def load_server_state(self, state: dict[str, torch.Tensor]) -> None:
        rows = {g: iter(state[f"group{g}"]) for g in range(self.setup.num_groups)}
        self.models = [next(rows[self.setup.group_of(k)]).clone() for k in range(self.setup.num_clients)]

    def client_update(self, client: Client, payload: torch.Tensor) -> Update:
        model, layout = self.setup.model_for(client.id), self._layout(client.id)
        layout.load(model, payload)
        loss = self.local_training(client)["train_loss"]
        client.state["model"].copy_(layout.flatten(model))
        up = torch.cat([client.state["model"], client.data.y_train.float().cpu()])
        return Update(up, 1.0, {"train_loss": loss})

    def load_for_eval(self, client: Client, payload: torch.Tensor) -> None:
        self._layout(client.id).load(self.setup.model_for(client.id), payload)
