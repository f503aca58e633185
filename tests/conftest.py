"""Shared pytest fixtures: a real Mosquitto per session, a fresh one per fault test, MQTT probes.

* ``mosquitto`` (session) -> :class:`BrokerInfo` of one Mosquitto started from the repo config
  (generated listener + ``compose/mosquitto/conf.d/tuning.conf``) on a free loopback port.
* ``mosquitto_process`` (session) -> the :class:`MosquittoProcess` behind ``mosquitto``
  (read its log; do not stop it).
* ``start_mosquitto`` (function) -> factory ``start_mosquitto(name, *, persistent=False,
  autosave_interval_s=None, extra_config="", port=None)`` returning a started
  :class:`MosquittoProcess` of the test's own (own port, own dir), free to
  ``kill()``/``restart()``; every broker it started is stopped after the test.
* ``secure_broker`` (function) -> factory ``secure_broker(role, root=None, passwords=None,
  pki=None, *, secrets=None, run_as_uid=None, start=True)`` returning a
  :class:`tests.securebroker.SecureBroker` of the shipped compose config (TLS, passwords, ACL),
  started unless ``start=False``; every one is stopped after the test.
* ``fresh_mosquitto`` / ``persistent_mosquitto`` (function) -> one such broker (plain, or keeping
  sessions across restarts); ``cloud_mosquitto`` / ``persistent_cloud_mosquitto`` -> a second
  one: the bridge tests' far side.
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
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from tests.securebroker import SecureBroker

__all__ = ["Message", "MqttProbe"]

INSTALL_HINT = (
    "mosquitto binary not found (looked on PATH and /usr/sbin): "
    "install it with `apt-get install mosquitto mosquitto-clients`"
)

ProbeFactory = Callable[..., MqttProbe]
BrokerFactory = Callable[..., MosquittoProcess]
SecureBrokerFactory = Callable[..., "SecureBroker"]


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


def persistence_config(workdir: Path, *, autosave_interval_s: int | None = None) -> str:
    """Mosquitto lines that keep sessions and retained messages in ``workdir`` across restarts."""
    lines = f"persistence true\npersistence_location {workdir}/\n"
    if autosave_interval_s is not None:
        lines += f"autosave_interval {autosave_interval_s}\n"
    return lines


@pytest.fixture
def start_mosquitto(tmp_path: Path) -> Iterator[BrokerFactory]:
    """``start_mosquitto(name="mosquitto", *, persistent=False, autosave_interval_s=None,
    extra_config="", port=None)`` -> a started :class:`MosquittoProcess` of the test's own in
    ``tmp_path / name``, on its own free port unless ``port`` is given.

    ``persistent`` keeps its sessions and retained messages on disk across ``restart()`` (and
    ``stop()``/``kill()`` then ``start()``), saving every ``autosave_interval_s`` if given;
    ``extra_config`` is appended to its configuration. After the test each broker is stopped
    (``stop()`` when persistent, else ``kill()``), whatever state the test left it in.
    """
    _require_mosquitto()
    made: list[tuple[MosquittoProcess, bool]] = []

    def start(
        name: str = "mosquitto",
        *,
        persistent: bool = False,
        autosave_interval_s: int | None = None,
        extra_config: str = "",
        port: int | None = None,
    ) -> MosquittoProcess:
        workdir = tmp_path / name
        config = extra_config
        if persistent:
            config = persistence_config(workdir, autosave_interval_s=autosave_interval_s) + config
        proc = MosquittoProcess(workdir, port=port, extra_config=config)
        made.append((proc, persistent))
        proc.start()
        return proc

    try:
        yield start
    finally:
        for proc, persistent in reversed(made):
            if persistent:
                proc.stop()
            else:
                proc.kill()


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[SecureBrokerFactory]:
    """``secure_broker(role, root=None, passwords=None, pki=None, *, secrets=None,
    run_as_uid=None, start=True)`` -> a :class:`tests.securebroker.SecureBroker`: the shipped
    compose config of ``role`` (``site`` or ``cloud``: TLS, passwords, ACL, the client-id
    plugin) in ``root`` (default ``tmp_path / role``), started unless ``start=False``. Each is
    stopped after the test."""
    from tests.securebroker import SecureBroker

    _require_mosquitto()
    made: list[SecureBroker] = []

    def make(
        role: str, root: Path | None = None, *args: Any, start: bool = True, **kwargs: Any
    ) -> SecureBroker:
        where = root if root is not None else tmp_path / role
        broker = SecureBroker(role, where, *args, **kwargs)
        made.append(broker)
        if start:
            broker.start()
        return broker

    try:
        yield make
    finally:
        for broker in reversed(made):
            broker.stop()


@pytest.fixture
def fresh_mosquitto(start_mosquitto: BrokerFactory) -> MosquittoProcess:
    return start_mosquitto("mosquitto")


@pytest.fixture
def persistent_mosquitto(start_mosquitto: BrokerFactory) -> MosquittoProcess:
    """A started Mosquitto of the test's own that keeps sessions across ``restart()``."""
    return start_mosquitto("persistent-mosquitto", persistent=True)


@pytest.fixture
def cloud_mosquitto(start_mosquitto: BrokerFactory) -> MosquittoProcess:
    """A second started Mosquitto of the test's own (the bridge tests' far broker)."""
    return start_mosquitto("cloud-mosquitto")


@pytest.fixture
def persistent_cloud_mosquitto(start_mosquitto: BrokerFactory) -> MosquittoProcess:
    """A second Mosquitto of the test's own that keeps sessions across ``stop()``/``start()``."""
    return start_mosquitto("persistent-cloud-mosquitto", persistent=True)


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
