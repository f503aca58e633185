"""An in-process amqtt broker for ``edgewise demo`` on machines without mosquitto.

amqtt 0.12 speaks MQTT 3.1.1 only. A client that sends an MQTT 5 CONNECT gets an MQTT 3.1.1
CONNACK with return code 1 (unacceptable protocol version) and the socket is closed; see
:data:`MQTT5_CONNACK_RETURN_CODE` and the tests for what paho reports.

Configuration (amqtt 0.12): ``amqtt.contexts.BrokerConfig`` with one ``"default"``
``ListenerConfig`` (``type="tcp"``, ``bind="127.0.0.1:PORT"``) and, as plugins, only
``AnonymousAuthPlugin`` with ``allow_anonymous``. The packet/event logger plugins and the
``$SYS`` plugin of amqtt's default plugin set are left out. ``Broker(config)`` must be created
inside the running loop; ``await broker.start()`` returns once the listener is bound and
``await broker.shutdown()`` closes sessions and the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import threading
from types import TracebackType
from typing import Any

from edgewise.local_broker.info import LOOPBACK, BrokerInfo, free_port

MQTT5_CONNACK_RETURN_CODE = 1
"""CONNACK return code amqtt sends to an MQTT 5 CONNECT (3.1.1 "unacceptable protocol version")."""

_QUIET_LOGGERS = ("amqtt", "transitions")
_PORT_ATTEMPTS = 5
_ANON_PLUGIN = "amqtt.plugins.authentication.AnonymousAuthPlugin"


def quiet_amqtt_logging(level: int = logging.WARNING) -> None:
    """Raise amqtt's (and its state machine library's) loggers to ``level``.

    Only loggers whose level was not set explicitly are changed, so a developer can still
    ``logging.getLogger("amqtt").setLevel(logging.DEBUG)`` before starting the broker.
    """
    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)


def _config(port: int) -> Any:
    from amqtt.contexts import BrokerConfig, ListenerConfig, ListenerType

    return BrokerConfig(
        listeners={"default": ListenerConfig(type=ListenerType.TCP, bind=f"{LOOPBACK}:{port}")},
        plugins={_ANON_PLUGIN: {"allow_anonymous": True}},
    )


def _is_addr_in_use(exc: BaseException) -> bool:
    cur: BaseException | None = exc
    while cur is not None:
        if isinstance(cur, OSError) and cur.errno == errno.EADDRINUSE:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


class EmbeddedBroker:
    """``async with EmbeddedBroker() as info:`` runs an amqtt broker on ``127.0.0.1``.

    MQTT 3.1.1 only, anonymous clients allowed, no persistence. ``port=None`` picks a free
    port (retrying if it is taken between picking and binding).
    """

    def __init__(self, port: int | None = None, *, quiet: bool = True) -> None:
        self._port = port
        self._quiet = quiet
        self._broker: Any = None
        self._info: BrokerInfo | None = None

    @property
    def info(self) -> BrokerInfo:
        if self._info is None:
            raise RuntimeError("EmbeddedBroker is not running")
        return self._info

    @property
    def running(self) -> bool:
        return self._broker is not None

    async def start(self) -> BrokerInfo:
        if self._broker is not None:
            raise RuntimeError("EmbeddedBroker already running")
        if self._quiet:
            quiet_amqtt_logging()
        from amqtt.broker import Broker
        from amqtt.errors import BrokerError

        attempts = 0
        while True:
            attempts += 1
            port = self._port if self._port is not None else free_port()
            broker = Broker(_config(port))
            try:
                await broker.start()
            except BrokerError as exc:
                if self._port is None and attempts < _PORT_ATTEMPTS and _is_addr_in_use(exc):
                    continue
                raise
            self._broker = broker
            self._info = BrokerInfo(host=LOOPBACK, port=port, kind="embedded")
            return self._info

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        self._info = None
        if broker is not None:
            await broker.shutdown()

    async def __aenter__(self) -> BrokerInfo:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class EmbeddedBrokerThread:
    """Synchronous wrapper: an :class:`EmbeddedBroker` on its own event loop in a daemon thread.

    For blocking callers (pytest fixtures, paho-based tools) that must not share a loop with the
    broker. ``with EmbeddedBrokerThread() as info:`` or ``start()``/``stop()``.
    """

    def __init__(self, port: int | None = None, *, quiet: bool = True) -> None:
        self._broker = EmbeddedBroker(port, quiet=quiet)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._info: BrokerInfo | None = None

    @property
    def info(self) -> BrokerInfo:
        if self._info is None:
            raise RuntimeError("EmbeddedBrokerThread is not running")
        return self._info

    def start(self, timeout_s: float = 10.0) -> BrokerInfo:
        if self._thread is not None:
            raise RuntimeError("EmbeddedBrokerThread already started")
        self._thread = threading.Thread(target=self._run, name="edgewise-amqtt", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise RuntimeError(f"embedded amqtt broker did not start within {timeout_s:g}s")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError(f"embedded amqtt broker failed to start: {self._error}") from (
                self._error
            )
        return self.info

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                self._info = await self._broker.start()
            except BaseException as exc:
                self._error = exc
                self._started.set()
                return
            self._started.set()
            try:
                await self._stop.wait()
            finally:
                await self._broker.stop()

        asyncio.run(main())

    def stop(self, timeout_s: float = 10.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop already finished
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout_s)
        self._info = None
        if thread.is_alive():
            raise RuntimeError(f"embedded amqtt broker did not stop within {timeout_s:g}s")

    def __enter__(self) -> BrokerInfo:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
