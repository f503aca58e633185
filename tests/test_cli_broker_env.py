"""EDGEWISE_BROKER is read by every command that connects, the services and the demo too:
--broker, then EDGEWISE_BROKER, then a service's [mqtt] settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main

from edgewise.cli.app import app
from edgewise.local_broker import BrokerInfo
from schemas import decode_status
from tests.conftest import ProbeFactory


def _broker_options() -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []

    def walk(command: Any, path: str) -> None:
        for p in command.params:
            if p.param_type_name == "option" and "--broker" in p.opts:
                found.append((path, p))
        if hasattr(command, "list_commands"):
            ctx = typer.Context(command)
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None
                walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(app), "")
    return found


def test_every_broker_option_reads_edgewise_broker() -> None:
    options = _broker_options()
    assert {"node", "worker", "demo", "watch", "sensor simulate"} <= {p for p, _ in options}
    assert all(o.envvar == "EDGEWISE_BROKER" for _, o in options), [
        p for p, o in options if o.envvar != "EDGEWISE_BROKER"
    ]


@pytest.mark.parametrize("flag", [False, True], ids=["env-over-config", "flag-over-env"])
def test_node_takes_its_broker_from_edgewise_broker(
    mosquitto: BrokerInfo, mqtt_probe: ProbeFactory, tmp_path: Path, flag: bool
) -> None:
    node = f"envb-{int(flag)}-{time.monotonic_ns()}"
    probe = mqtt_probe()
    probe.subscribe(f"edge/{node}/status")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWISE_")}
    env.update(
        EDGEWISE_NODE_ID=node,
        EDGEWISE_STORAGE__STATE_DIR=str(tmp_path),
        EDGEWISE_MQTT__PORT="1",  # [mqtt] names a port where nothing listens
        EDGEWISE_BROKER="mqtt://127.0.0.1:1" if flag else mosquitto.url,
    )
    command = [sys.executable, "-m", "edgewise.cli.app", "node"]
    if flag:
        command += ["--broker", mosquitto.url]
    with (tmp_path / "node.log").open("wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    try:
        probe.wait_for(lambda m: bool(m.payload) and decode_status(m.payload).state == "online", 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        probe.publish(f"edge/{node}/status", b"", qos=1, retain=True)


def test_demo_help_names_the_variable() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edgewise.cli.app", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert "EDGEWISE_BROKER" in out.stdout
