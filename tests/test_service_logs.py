"""Every service's log with stderr a file (as under systemd or docker): one line per record,
never wrapped, ISO 8601 UTC times; with the json format one JSON object per line that names the
service and its id."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgewise.local_broker import BrokerInfo, MosquittoProcess
from tests.bridgeharness import BridgeProcess, Rule, write_bridge_config
from tests.nodeprocs import NodeProcesses
from tests.test_worker_harness import write_worker_toml

TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: \S"
)
LONG = "a-directory-name-long-enough-that-every-path-in-the-log-passes-eighty-columns"


def _wait_for(log: Path, marker: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while marker not in log.read_text(errors="replace"):
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {marker!r}:\n{log.read_text()}")
        assert time.monotonic() < deadline, f"no {marker!r} in the log:\n{log.read_text()}"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def _check(text: str, fmt: str, service: str, service_id: str) -> None:
    lines = text.splitlines()
    assert len(lines) >= 3, text
    # Paths under LONG make records longer than 80 columns: a wrapping handler would split them.
    assert max(len(line) for line in lines) > 80, text
    if fmt == "text":
        bad = [line for line in lines if not TEXT_LINE.match(line)]
        assert not bad, f"lines that do not start a record (a record split over lines?): {bad}"
        return
    docs = [json.loads(line) for line in lines]  # every line is one JSON object
    for doc in docs:
        assert doc["service"] == service
        assert doc["service_id"] == service_id
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["ts"])
        assert doc["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
        assert doc["logger"] and doc["message"] and doc["event"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_node_log_is_one_line_per_record(mosquitto: BrokerInfo, tmp_path: Path, fmt: str) -> None:
    state = tmp_path / LONG
    state.mkdir()
    # The format from the environment (EDGEWISE_LOG_FORMAT), stderr a file.
    nodes = NodeProcesses(mosquitto, state, f"logs-{fmt}", env={"EDGEWISE_LOG_FORMAT": fmt})
    proc = nodes.start()
    log = state / "node-0.log"
    try:
        _wait_for(log, "outbox", proc)
        _stop(proc)
    finally:
        nodes.stop_all()
    _check(log.read_text(), fmt, "node", f"logs-{fmt}")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_worker_log_is_one_line_per_record(mosquitto: BrokerInfo, tmp_path: Path, fmt: str) -> None:
    home = tmp_path / LONG
    home.mkdir()
    wid = f"logs-w-{fmt}"
    cfg = write_worker_toml(home / "worker.toml", mosquitto, wid, home / "store.db")
    log, ready = home / "worker.log", home / "worker.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWISE_")}
    # The format from the flag. The log is stderr; stdout has the worker's "ready on" line.
    command = [sys.executable, "-m", "edgewise.cli.app", "worker", "-c", str(cfg)]
    with log.open("wb") as err, ready.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "--log-format", fmt],
            env=env,
            stdout=out,
            stderr=err,
        )
    try:
        _wait_for(ready, "ready on", proc)
        _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    _check(log.read_text(), fmt, "worker", wid)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_bridge_log_is_one_line_per_record(
    mosquitto: BrokerInfo, cloud_mosquitto: MosquittoProcess, tmp_path: Path, fmt: str
) -> None:
    cloud = cloud_mosquitto.info
    home = tmp_path / LONG
    home.mkdir()
    cfg = write_bridge_config(
        home / "bridge.toml", mosquitto, cloud, [Rule("up", "edge/#")], bridge_id=f"br-{fmt}"
    )
    log = home / "bridge.log"
    # BridgeProcess writes a marker line of its own first: the bridge's log follows it.
    bridge = BridgeProcess(cfg, log, env={"EDGEWISE_LOG_FORMAT": fmt, "COLUMNS": "80"})
    bridge.start()
    try:
        bridge.wait_started()
        assert bridge.terminate() == 0
    finally:
        bridge.stop()
    text = log.read_text().split("---\n", 1)[1]
    _check(text, fmt, "bridge", f"br-{fmt}")
