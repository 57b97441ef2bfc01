"""The ``network:`` section: simulated devices, availability, dropout, deadline and over-selection.

Off by default (``enabled: false``): a run is then exactly what it is without this section. Setting any
other key while the network is off is an error, so that a forgotten ``enabled`` does not go unnoticed.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .trace import read_trace

SIGMA_MAX = 5.0  # lognormal spread: exp(5) is a factor of 148 for one standard deviation
RATE_MAX = 1e6  # Mbit/s, and the relative speed


class NetworkConfig(BaseModel):
    """Each client's device (bandwidth, latency, speed), whether it takes part in a round, and when the
    server stops waiting. Formulas and status codes: docs/network.md."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    enabled: bool = Field(False, description="simulate the network and devices (false: every sampled client trains)")
    down_mbps: float = Field(20.0, gt=0, le=RATE_MAX, description="median downlink bandwidth of a client (Mbit/s)")
    up_mbps: float = Field(5.0, gt=0, le=RATE_MAX, description="median uplink bandwidth of a client (Mbit/s)")
    latency_ms: float = Field(
        50.0, ge=0, le=1e6, description="median latency (ms), paid once by the download and once by the upload"
    )
    speed: float = Field(
        1.0, gt=0, le=RATE_MAX, description="median compute speed of a client, relative to the reference device"
    )
    bandwidth_sigma: float = Field(
        0.0, ge=0, le=SIGMA_MAX, description="lognormal sigma of both bandwidths around their medians (0: all equal)"
    )
    latency_sigma: float = Field(0.0, ge=0, le=SIGMA_MAX, description="lognormal sigma of the latency (0: all equal)")
    speed_sigma: float = Field(
        0.0,
        ge=0,
        le=SIGMA_MAX,
        description="lognormal sigma of the compute speed (0: all equal); stragglers come from it",
    )
    trace: str | None = Field(
        None,
        description="CSV of devices (client,down_mbps,up_mbps,latency_ms,speed; clients 0..M-1), replacing the "
        "four medians and sigmas; client k gets row k mod M. Relative to the working directory; kept absolute",
    )
    seconds_per_sample: float = Field(
        0.001, ge=0, le=1e3, description="compute seconds per training sample and local epoch at speed 1"
    )
    availability: float = Field(
        1.0, ge=0, le=1, description="probability that a sampled client is available in a round (mean, if periodic)"
    )
    availability_amplitude: float = Field(
        0.0, ge=0, le=1, description="periodic (diurnal) swing of the availability around its mean (needs a period)"
    )
    availability_period: float = Field(
        0.0, ge=0, le=1e9, description="rounds per availability cycle, each client with its own phase; 0 = constant"
    )
    dropout: float = Field(
        0.0, ge=0, le=1, description="probability that an available client drops out during the round (no upload)"
    )
    deadline: float | None = Field(
        None, gt=0, le=1e9, description="simulated seconds after which the server closes the round; null = none"
    )
    over_selection: float = Field(
        0.0,
        ge=0,
        le=10,
        description="sample ceil(K (1 + over_selection)) clients and keep the first K to arrive (K: clients_per_round)",
    )

    @field_validator("trace")
    @classmethod
    def _readable_trace(cls, path: str | None) -> str | None:
        if path is None:
            return None
        read_trace(path)  # a missing or broken file: one line, before any rank starts
        return str(Path(path).expanduser().resolve())  # kept absolute: a resume finds it from anywhere

    @model_validator(mode="after")
    def _consistent(self) -> NetworkConfig:
        if self.availability_amplitude > 0 and self.availability_period == 0:
            raise ValueError(
                "network.availability_amplitude > 0 needs network.availability_period > 0 (rounds per cycle)"
            )
        if not self.enabled:
            changed = [
                k for k, f in type(self).model_fields.items() if k != "enabled" and getattr(self, k) != f.default
            ]
            if changed:
                raise ValueError(
                    f"network.{changed[0]} is set but the simulated network is off: set network.enabled=true"
                )
        return self
