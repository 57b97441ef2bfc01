"""The trained networks of a run file as PyTorch state_dicts (``pfl-mpi export RUN.h5 --model DIR``).

The run's configuration (in the file) rebuilds the networks and the algorithm's layouts on the CPU, as every
rank built them; the last state snapshot (``/global/state``, ``/clients/state``: docs/hdf5.md) is loaded into
them and each network's ``state_dict()`` is written with ``torch.save``:

- ``global.pt``: the server's shared model (state ``shared``: FedAvg and its family). Parameters the algorithm
  keeps personal (FedPer's head, LG-FedAvg's base) are at their initial values there: use a client's file.
- ``client_<k>.pt``: client k's own network, where the algorithm has one: the shared model with k's personal
  parameters and buffers (state ``personal``: FedPer, LG-FedAvg, FedRep, FedAvg with ``model.buffers:
  personal``), k's whole model (``model``: Local, FedProto, FedGKT, FedMD, FedAMP) or Ditto's ``v``.

``torch.load(path)`` and ``load_state_dict`` put one into the network the configuration builds
(``load_network`` does both).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml
from torch import nn

from ..models import ParamLayout, split_names

GLOBAL_NAME = "global.pt"


def client_file(k: int) -> str:
    return f"client_{k}.pt"


class RunNetworks:
    """The networks of a run file, rebuilt from its configuration, and its layouts of their flat states."""

    def __init__(self, path: str | Path):
        from ..config import validate
        from ..data import load_federated
        from ..runtime.build import build_algorithm
        from ..store.reader import read_config_text

        self.path = Path(path)
        self.cfg = validate(yaml.safe_load(read_config_text(self.path)))
        data = load_federated(self.cfg.data, self.cfg.seed)
        with torch.random.fork_rng(devices=[]):
            self.algo = build_algorithm(self.cfg, data)
        self.setup = self.algo.setup
        self.num_clients = data.num_clients
        personal = getattr(self.algo, "personal", None)
        model = self.setup.model
        everything = ([n for n, _ in model.named_parameters()], [])
        shared, own = split_names(model, personal) if callable(personal) else everything
        self.shared, self.personal = ParamLayout(model, shared), ParamLayout(model, own)

    def _load(self, layout: ParamLayout, model: nn.Module, flat: np.ndarray, what: str) -> None:
        if flat.size != layout.numel:
            raise ValueError(f"{what} has {flat.size} values, the rebuilt network's layout {layout.numel}")
        layout.load(model, torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32)))

    def write(self, out_dir: str | Path) -> tuple[list[Path], int]:
        """Write global.pt and client_<k>.pt of the last snapshot into ``out_dir``: (files, snapshot round)."""
        from ..store.reader import read_client_states

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with h5py.File(self.path, "r", locking=False) as f:
            glob = {n: ds[-1] for n, ds in f["global/state"].items() if isinstance(ds, h5py.Dataset) and n != "round"}
            names = _state_names(f["clients/state"])
            rounds = f["global/state/round"][...] if "round" in f["global/state"] else f["clients/state/round"][...]
        if not len(rounds):
            raise ValueError(f"{self.path} has no state snapshot yet")
        written: list[Path] = []
        model = self.setup.model
        if "shared" in glob and len(self.setup.models) == 1:
            self._load(self.shared, model, glob["shared"], "/global/state/shared")
            written.append(_save(model, out / GLOBAL_NAME))
        client_state = next((n for n in ("personal", "model", "v") if n in names), None)
        if "phi" in glob:  # pFedHN: each client's network is generated from its embedding (and its own head)
            written += self._generated_networks(glob["phi"], names, out)
        elif client_state is not None:
            states = read_client_states(self.path, client_state)
            for k, flat in enumerate(states):
                written.append(_save(self._client_network(client_state, k, flat, glob), out / client_file(k)))
        if not written:
            raise ValueError(f"{self.algo.name} keeps no network state that export --model can write")
        (out / "export.json").write_text(
            json.dumps({"run": str(self.path), "algorithm": self.algo.name, "round": int(rounds[-1])}, indent=1)
        )
        return written, int(rounds[-1])

    def _generated_networks(self, phi: np.ndarray, names: set[str], out: Path) -> list[Path]:
        """pFedHN: the hypernetwork of the snapshot (``phi``) generates every client's parameters, as it does
        to evaluate; pFedHN-PC's clients add their own heads (client state ``head``)."""
        from ..store.reader import read_client_states

        algo = self.algo
        algo.init_server()
        self._load(algo.phi_layout, algo.hnet, phi, "/global/state/phi")
        theta = algo.downlink(0, list(range(self.num_clients)), "eval")
        heads = read_client_states(self.path, "head") if "head" in names else None
        written = []
        for k in range(self.num_clients):
            model = self.setup.model_for(k)
            algo.layout.load(model, theta[k])
            if heads is not None:
                self._load(algo.personal_layout, model, heads[k], f"client {k}'s head")
            written.append(_save(model, out / client_file(k)))
        return written

    def _client_network(self, state: str, k: int, flat: np.ndarray, glob: dict[str, np.ndarray]) -> nn.Module:
        model = self.setup.model_for(k)
        if state == "personal":
            self._load(self.shared, model, glob["shared"], "/global/state/shared")
            self._load(self.personal, model, flat, f"client {k}'s personal state")
        elif state == "v":
            self._load(self.shared, model, flat, f"client {k}'s state v")
        else:
            self._load(ParamLayout(model, [n for n, _ in model.named_parameters()]), model, flat, f"client {k}'s model")
        return model


def _state_names(states: h5py.Group) -> set[str]:
    """The client state names, whether the tables are per architecture group (``group<g>/<name>``) or not."""
    names = set()
    for n, item in states.items():
        if isinstance(item, h5py.Group):
            names |= set(item)
        elif n != "round":
            names.add(n)
    return names


def _save(model: nn.Module, path: Path) -> Path:
    torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, path)
    return path


def export_models(path: str | Path, out_dir: str | Path) -> tuple[list[Path], int]:
    """Write the run's global and per-client networks as state_dict files (module docstring)."""
    return RunNetworks(path).write(out_dir)


def load_network(path: str | Path, state_file: str | Path) -> nn.Module:
    """The network the run's configuration builds (client k's architecture group for ``client_<k>.pt``),
    holding the state_dict in ``state_file``."""
    nets = RunNetworks(path)
    name = Path(state_file).stem
    model = nets.setup.model_for(int(name.split("_")[1])) if name.startswith("client_") else nets.setup.model
    model.load_state_dict(torch.load(state_file, weights_only=True))
    return model
