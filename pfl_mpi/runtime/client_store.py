"""What a worker keeps of its clients between rounds: per architecture group, one table per state name,
one row per hosted client of that group (no model objects)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch


class ClientStore:
    """Persistent per-client state of the clients hosted on this rank.

    ``spec``: the state names and sizes of every client, or one such spec per architecture group with
    ``groups`` (the group of every client id, as ``Setup.groups``).
    """

    def __init__(
        self,
        spec: Mapping[str, int] | Sequence[Mapping[str, int]],
        clients: Sequence[int],
        init: Callable[[int], dict[str, torch.Tensor]],
        groups: np.ndarray | None = None,
    ):
        self.specs = [dict(spec)] if isinstance(spec, Mapping) else [dict(s) for s in spec]
        self.numels = [sum(s.values()) for s in self.specs]
        group_of = (lambda k: 0) if groups is None else (lambda k: int(groups[k]))
        self.row: dict[int, tuple[int, int]] = {}  # client -> (group, row in the group's tables)
        counts = [0] * len(self.specs)
        for k in clients:
            g = group_of(int(k))
            self.row[int(k)] = (g, counts[g])
            counts[g] += 1
        self.tables = [
            {name: torch.empty(n, numel) for name, numel in s.items()} for s, n in zip(self.specs, counts, strict=True)
        ]
        for k in clients:
            g, i = self.row[int(k)]
            for name, value in init(int(k)).items():
                self.tables[g][name][i] = value

    @property
    def spec(self) -> dict[str, int]:
        """The spec of the first (with one group: the only) architecture group."""
        return self.specs[0]

    @property
    def numel(self) -> int:
        """State floats per client of the first (with one group: the only) architecture group."""
        return self.numels[0]

    def numel_of(self, client: int) -> int:
        return self.numels[self.row[client][0]]

    def views(self, client: int) -> dict[str, torch.Tensor]:
        """Writable views of ``client``'s rows."""
        g, i = self.row[client]
        return {name: table[i] for name, table in self.tables[g].items()}

    def _state(self, client: int) -> torch.Tensor:
        g, i = self.row[client]
        parts = [table[i] for table in self.tables[g].values()]
        return torch.cat(parts) if parts else torch.zeros(0)

    def pack_flat(self, clients: Sequence[int]) -> np.ndarray:
        """The state of ``clients`` concatenated (each client's names in spec order), float32 1-D."""
        out = np.empty(sum(self.numel_of(k) for k in clients), dtype=np.float32)
        offset = 0
        for k in clients:
            n = self.numel_of(k)
            if n:
                out[offset : offset + n] = self._state(k).numpy()
            offset += n
        return out

    def pack(self, clients: Sequence[int]) -> np.ndarray:
        """The state of ``clients`` as one float32 array [len(clients), numel]; they must share a group's size."""
        widths = {self.numel_of(k) for k in clients} or {self.numel}
        if len(widths) > 1:
            raise ValueError("clients of architecture groups with different state sizes: use pack_flat")
        return self.pack_flat(clients).reshape(len(clients), widths.pop())

    def unpack(self, clients: Sequence[int], values: np.ndarray) -> None:
        """Overwrite the state of ``clients`` from ``pack``'s or ``pack_flat``'s layout (copies)."""
        flat = np.ascontiguousarray(values).reshape(-1)
        offset = 0
        for k in clients:
            g, i = self.row[k]
            for name, numel in self.specs[g].items():
                self.tables[g][name][i] = torch.from_numpy(flat[offset : offset + numel])
                offset += numel
