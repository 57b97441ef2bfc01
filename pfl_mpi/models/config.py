"""Configuration of the target networks."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelConfig(BaseModel):
    """Which network every client trains, and where its personal head begins."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["logreg", "mlp", "cnn1d", "cnn2d"] = Field(
        "mlp",
        description="Network: multinomial logistic regression, MLP, MNIST-1D CNN (Greydanus 2020) "
        "or the LeNet-style CNN of pFedHN (Shamsian et al. 2021).",
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

    def num_layers(self) -> int:
        """Number of layers of the network, i.e. the largest valid ``head_layers``."""
        if self.name == "logreg":
            return 1
        if self.name == "mlp":
            return len(self.hidden) + 1
        if self.name == "cnn1d":
            return 4
        return 2 + len(self.cnn2d_fc) + 1
