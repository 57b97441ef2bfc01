"""Configuration of the target networks: one architecture for every client, or several assigned to clients."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

Assignment = Literal["round_robin", "blocks"]


class ArchitectureConfig(BaseModel):
    """One network: which one, its sizes, and where its personal head begins."""

    model_config = ConfigDict(extra="forbid")

    name: Literal[
        "logreg", "mlp", "cnn1d", "cnn2d", "pfedhn_cnn", "resnet8", "resnet18", "femnist_cnn", "shakespeare_lstm"
    ] = Field(
        "mlp",
        description="Network: multinomial logistic regression, MLP, MNIST-1D CNN (Greydanus 2020), the "
        "LeNet-style CNN of pFedHN (Shamsian et al. 2021) for any image size (cnn2d) or exactly as in the paper "
        "(pfedhn_cnn, 32 x 32 x 3), ResNet-8 / ResNet-18 with GroupNorm, LEAF's FEMNIST CNN, or LEAF's "
        "Shakespeare LSTM. Sizes and references: pfl_mpi/models/zoo.py.",
    )
    hidden: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [64],
        description="mlp only: widths of the hidden Linear+ReLU layers.",
    )
    head_layers: int = Field(
        1,
        ge=1,
        description="How many of the final layers form the head (personal in FedPer, shared in LG-FedAvg); "
        "1 = the last linear layer. A layer is a Linear or a convolution with its ReLU (and pooling).",
    )
    cnn1d_channels: int = Field(25, ge=1, description="cnn1d only: channels of each of the 3 conv layers.")
    cnn2d_channels: int = Field(
        16, ge=1, description="cnn2d only: channels of the first conv layer; the second has twice as many."
    )
    cnn2d_fc: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [120, 84],
        description="cnn2d only: widths of the hidden fully connected layers after the convolutions.",
    )

    groupnorm_groups: int = Field(
        2, ge=1, description="resnet8 / resnet18 only: groups of every GroupNorm (2: Hsieh et al. 2020)."
    )
    embedding_dim: int = Field(8, ge=1, description="shakespeare_lstm only: size of the character embedding.")
    lstm_hidden: int = Field(256, ge=1, description="shakespeare_lstm only: units of each LSTM layer.")
    lstm_layers: int = Field(2, ge=1, description="shakespeare_lstm only: stacked LSTM layers.")
    vocab_size: int | None = Field(
        None, ge=1, description="shakespeare_lstm only: token ids 0..vocab_size-1; None: the number of classes."
    )

    def num_layers(self) -> int:
        """Number of layers of the network, i.e. the largest valid ``head_layers``."""
        from pfl_mpi.models.zoo import LAYERS

        if self.name in LAYERS:
            return LAYERS[self.name]
        if self.name == "logreg":
            return 1
        if self.name == "mlp":
            return len(self.hidden) + 1
        if self.name == "cnn1d":
            return 4
        return 2 + len(self.cnn2d_fc) + 1


class ModelConfig(ArchitectureConfig):
    """The ``model`` section: the network every client trains, or several architectures (heterogeneous clients).

    Without ``architectures`` (the default) every client has the network described by the section's own
    fields. With a list, client k gets ``architectures[g]`` with g from ``assignment``; each entry is an
    architecture whose unset keys take the section's values (so ``head_layers`` set once applies to all).
    """

    architectures: list[ArchitectureConfig] = Field(
        default_factory=list,
        description="Heterogeneous clients: one network per architecture group, each entry written like this "
        "section (name, hidden, head_layers, ...; unset keys inherit the section's). Empty: one network for "
        "all clients, the section's own. Only algorithms that support heterogeneous clients accept several.",
    )
    assignment: Assignment = Field(
        "round_robin",
        description="Which clients get which entry of architectures: round_robin (client k gets entry k mod G) "
        "or blocks (contiguous, equal ranges of client ids: the first N/G clients entry 0, ...).",
    )

    @model_validator(mode="before")
    @classmethod
    def _inherit_section(cls, data: Any) -> Any:
        """Each entry of ``architectures`` starts from the architecture keys set in the section itself."""
        if not isinstance(data, dict) or not isinstance(data.get("architectures"), list):
            return data
        shared = {k: v for k, v in data.items() if k in ArchitectureConfig.model_fields}
        entries = [{**shared, **entry} if isinstance(entry, dict) else entry for entry in data["architectures"]]
        return {**data, "architectures": entries}

    def specs(self) -> list[ArchitectureConfig]:
        """The architecture of each group, in group order (one group: the section itself)."""
        return list(self.architectures) or [self]

    @property
    def num_groups(self) -> int:
        return max(len(self.architectures), 1)

    def groups(self, num_clients: int) -> np.ndarray:
        """The architecture group of every client, int64 [num_clients] (all 0 with one architecture)."""
        k, g = np.arange(num_clients, dtype=np.int64), self.num_groups
        return k % g if self.assignment == "round_robin" else (k * g) // max(num_clients, 1)
