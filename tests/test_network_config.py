"""The ``network:`` section validates before any rank starts: one line naming the key, exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pfl_mpi.config import load_config
from pfl_mpi.errors import ConfigError
from pfl_mpi.network import NetworkConfig

GOOD_TRACE = "client,down_mbps,up_mbps,latency_ms,speed\n0,10,2,40,1\n1,50,10,20,2\n"


def test_off_by_default():
    cfg = load_config(None, [])
    assert cfg.network == NetworkConfig() and not cfg.network.enabled
    assert "network" in cfg.to_yaml()  # the resolved config shows the section (and reloads: defaults only)


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("network.deadline=-1", "network.deadline"),
        ("network.deadline=0", "network.deadline"),
        ("network.availability=1.5", "network.availability"),
        ("network.dropout=-0.1", "network.dropout"),
        ("network.over_selection=-1", "network.over_selection"),
        ("network.over_selection=11", "network.over_selection"),
        ("network.down_mbps=0", "network.down_mbps"),
        ("network.latency_ms=-5", "network.latency_ms"),
        ("network.speed_sigma=9", "network.speed_sigma"),
        ("network.seconds_per_sample=-1", "network.seconds_per_sample"),
        ("network.availability_period=-2", "network.availability_period"),
        ("network.bogus=1", "network.bogus"),
        ("network.availability_amplitude=0.3", "network.availability_amplitude"),
        ("network.trace=/no/such/trace.csv", "network.trace"),
    ],
)
def test_bad_keys_name_the_key(setting, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["network.enabled=true", setting])
    text = str(err.value)
    assert key in text and "\n" not in text


def test_a_key_set_while_the_network_is_off_is_an_error():
    with pytest.raises(ConfigError, match=r"network.deadline is set but the simulated network is off"):
        load_config(None, ["network.deadline=5"])
    assert load_config(None, ["network.enabled=true", "network.deadline=5"]).network.deadline == 5


def test_trace_is_read_at_validation(tmp_path):
    path = tmp_path / "devices.csv"
    path.write_text(GOOD_TRACE)
    assert load_config(None, ["network.enabled=true", f"network.trace={path}"]).network.trace == str(path.resolve())
    path.write_text("client,down_mbps\n0,1\n")
    with pytest.raises(ConfigError, match=r"^network.trace: .*lacks the column") as err:
        load_config(None, ["network.enabled=true", f"network.trace={path}"])
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "settings",
    [
        ["network.enabled=true", "network.deadline=-1"],
        ["network.enabled=true", "network.trace=/no/such/trace.csv"],
        ["network.dropout=0.2"],
    ],
)
def test_cli_exits_2_with_one_line(settings, tmp_path):
    args = [arg for s in settings for arg in ("--set", s)]
    run = subprocess.run(
        [sys.executable, "-m", "pfl_mpi", "run", "-n", "2", "--out", str(tmp_path / "x.h5"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    key = settings[-1].split("=")[0]
    assert len(lines) == 1 and lines[0].startswith("pfl-mpi: config error: network") and key in lines[0]
    assert not (tmp_path / "x.h5").exists()
