"""Shared pytest fixtures: a real Mosquitto per session, a fresh one per fault test, MQTT probes.

* ``mosquitto`` (session) -> :class:`BrokerInfo` of one Mosquitto started from the repo config
  (generated listener + ``compose/mosquitto/conf.d/tuning.conf``) on a free loopback port.
* ``mosquitto_process`` (session) -> the :class:`MosquittoProcess` behind ``mosquitto``
  (read its log; do not stop it).
* ``fresh_mosquitto`` (function) -> a started :class:`MosquittoProcess` of the test's own
  (own port, own dir), free to ``kill()``/``restart()``.
* ``cloud_mosquitto`` / ``persistent_cloud_mosquitto`` (function) -> a second broker of the
  test's own (plain, or keeping sessions across restarts): the bridge tests' far side.
* ``embedded_broker`` (function) -> :class:`BrokerInfo` of an in-process amqtt broker
  (MQTT 3.1.1 only) running on its own thread and loop.
* ``mqtt_probe`` (function) -> factory ``mqtt_probe(broker=None, **kwargs)`` returning a
  connected :class:`MqttProbe` (default broker: the session ``mosquitto``); every probe it made
  is closed after the test.

A missing mosquitto binary stops the whole run with a one-line install hint: these tests are
about the real broker, so they never skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgewise.local_broker import (
    BrokerInfo,
    EmbeddedBrokerThread,
    Message,
    MosquittoProcess,
    MqttProbe,
    live_processes,
    mosquitto_path,
)

__all__ = ["Message", "MqttProbe"]

INSTALL_HINT = (
    "mosquitto binary not found (looked on PATH and /usr/sbin): "
    "install it with `apt-get install mosquitto mosquitto-clients`"
)

ProbeFactory = Callable[..., MqttProbe]


def _require_mosquitto() -> None:
    if mosquitto_path() is None:
        pytest.exit(INSTALL_HINT, returncode=pytest.ExitCode.TESTS_FAILED)


@pytest.fixture(scope="session")
def mosquitto_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    _require_mosquitto()
    proc = MosquittoProcess(tmp_path_factory.mktemp("mosquitto"))
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def mosquitto(mosquitto_process: MosquittoProcess) -> BrokerInfo:
    return mosquitto_process.info


@pytest.fixture
def fresh_mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    _require_mosquitto()
    proc = MosquittoProcess(tmp_path / "mosquitto")
    try:
        proc.start()
        yield proc
    finally:
        proc.kill()


@pytest.fixture
def persistent_mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A started Mosquitto of the test's own that keeps sessions across ``restart()``."""
    _require_mosquitto()
    workdir = tmp_path / "persistent-mosquitto"
    proc = MosquittoProcess(
        workdir, extra_config=f"persistence true\npersistence_location {workdir}/\n"
    )
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def cloud_mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A second started Mosquitto of the test's own (the bridge tests' far broker)."""
    _require_mosquitto()
    proc = MosquittoProcess(tmp_path / "cloud-mosquitto")
    try:
        proc.start()
        yield proc
    finally:
        proc.kill()


@pytest.fixture
def persistent_cloud_mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A second Mosquitto of the test's own that keeps sessions across ``stop()``/``start()``."""
    _require_mosquitto()
    workdir = tmp_path / "persistent-cloud-mosquitto"
    proc = MosquittoProcess(
        workdir, extra_config=f"persistence true\npersistence_location {workdir}/\n"
    )
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def embedded_broker() -> Iterator[BrokerInfo]:
    broker = EmbeddedBrokerThread()
    try:
        yield broker.start()
    finally:
        broker.stop()


@pytest.fixture
def mqtt_probe(request: pytest.FixtureRequest) -> Iterator[ProbeFactory]:
    """``probe = mqtt_probe(broker=None, client_id=None, *, connect=True, **MqttProbe kwargs)``."""
    made: list[MqttProbe] = []

    def make(
        broker: BrokerInfo | None = None,
        client_id: str | None = None,
        *,
        connect: bool = True,
        **kwargs: Any,
    ) -> MqttProbe:
        info = broker if broker is not None else request.getfixturevalue("mosquitto")
        probe = MqttProbe(info, client_id, **kwargs)
        made.append(probe)
        if connect:
            probe.connect()
        return probe

    yield make
    errors: list[BaseException] = []
    for probe in made:
        try:
            probe.close()
        except Exception as exc:  # close every probe even if one fails
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``small_filesystem("512k")`` mounts a real tmpfs of that size (needs root; else skips)."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"fs{len(mounts)}"
        where.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"mount -t tmpfs not permitted here: {done.stderr.decode().strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Safety net: no broker outlives the test run, whatever happened in the fixtures."""
    for proc in live_processes():
        proc.kill()
