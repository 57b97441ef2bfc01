"""Configuration of the target networks: one architecture for every client, or several assigned to clients.

``name`` is a built-in network, ``package.module:factory`` or a name a plugin registered
(``pfl_mpi.models.register_model``); a user network's options are the section's other keys, checked against the
factory's signature once the plugins are imported (``pfl_mpi.models.user``)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import InitErrorDetails, ValidationError

Assignment = Literal["round_robin", "blocks"]
BuffersPolicy = Literal["shared", "personal", "refuse"]
BUILTIN = ("logreg", "mlp", "cnn1d", "cnn2d", "pfedhn_cnn", "resnet8", "resnet18", "femnist_cnn", "shakespeare_lstm")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_NAME = re.compile(r"^[A-Za-z_][\w.-]*$")


class ArchitectureConfig(BaseModel):
    """One network: which one, its sizes, and where its personal head begins.

    Extra keys are a user network's options (``name`` = ``package.module:factory`` or a registered name); a
    built-in network refuses them."""

    model_config = ConfigDict(allow_inf_nan=False, extra="allow")

    name: str = Field(
        "mlp",
        description="Network: multinomial logistic regression, MLP, MNIST-1D CNN (Greydanus 2020), the "
        "LeNet-style CNN of pFedHN (Shamsian et al. 2021) for any image size (cnn2d) or exactly as in the paper "
        "(pfedhn_cnn, 32 x 32 x 3), ResNet-8 / ResNet-18 with GroupNorm, LEAF's FEMNIST CNN, or LEAF's "
        "Shakespeare LSTM (sizes and references: pfl_mpi/models/zoo.py); or your own torch.nn.Module: "
        "package.module:factory, or a name a plugin registered (docs/models.md).",
    )
    head: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None,
        min_length=1,
        description="User networks: the head (personal in FedPer/FedRep, shared in LG-FedAvg) as parameter-name "
        "prefixes, e.g. [fc] (fc.weight, fc.bias, fc.*); unset: the module's head_prefixes() method, if any. "
        "Built-in networks split by head_layers.",
    )
    buffers: BuffersPolicy = Field(
        "shared",
        description="Registered buffers (BatchNorm running statistics): shared (treated like the parameters of "
        "their name: they move and are averaged where the algorithm shares parameters, stay on the client where "
        "it keeps them), personal (every buffer is client state: FedBN's rule) or refuse (a network with "
        "buffers is an error). Algorithms that do not handle buffers refuse such networks.",
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

    @field_validator("name")
    @classmethod
    def _known_form(cls, name: str) -> str:
        """A built-in name, ``package.module:factory`` or a plain name (a plugin's: checked once plugins are
        imported, by ``check_networks``)."""
        if name in BUILTIN or _FACTORY.match(name) or _NAME.match(name):
            return name
        raise ValueError(f"{name!r} is neither a network name nor package.module:factory")

    @model_validator(mode="after")
    def _builtin_takes_no_options(self) -> ArchitectureConfig:
        """A built-in network refuses keys it does not have (a user network's are checked against its factory)."""
        if self.name in BUILTIN and self.model_extra:
            key = next(iter(self.model_extra))
            detail = InitErrorDetails(type="extra_forbidden", loc=(key,), input=self.model_extra[key])
            raise ValidationError.from_exception_data(type(self).__name__, [detail])
        if self.name in BUILTIN and self.head is not None:
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [
                    InitErrorDetails(
                        type="value_error",
                        loc=("head",),
                        input=self.head,
                        ctx={"error": f"{self.name} is split by model.head_layers; model.head is for user networks"},
                    )
                ],
            )
        return self

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN

    @property
    def options(self) -> dict[str, Any]:
        """A user network's options: the section's keys that are not fields."""
        return dict(self.model_extra or {})

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
        """Each entry of ``architectures`` starts from the architecture keys set in the section itself (and,
        unless it names its own network, from the section's user-network options)."""
        if not isinstance(data, dict) or not isinstance(data.get("architectures"), list):
            return data
        fields = ArchitectureConfig.model_fields
        shared = {k: v for k, v in data.items() if k in fields}
        options = {k: v for k, v in data.items() if k not in fields and k not in cls.model_fields}
        entries = [
            {**shared, **({} if "name" in entry else options), **entry} if isinstance(entry, dict) else entry
            for entry in data["architectures"]
        ]
        return {**data, "architectures": entries}

    def check_networks(self) -> None:
        """Resolve every user network and validate its options (imports them: call after the plugins); raises
        ``ConfigError`` naming the key (``model.name``, ``model.<option>``, ``model.architectures.<g>.<key>``)."""
        from pfl_mpi.models.user import resolve_network

        for g, spec in enumerate(self.specs()):
            resolve_network(spec, f"model.architectures.{g}" if self.architectures else "model")

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
