"""A TCP proxy the tests control, to cut, stall and flap a link for real.

It runs its own event loop on a thread, so it keeps forwarding whatever the test's own loop
(or a node subprocess) is doing. Modes:

- ``pause()``: connections stay open but no byte moves in either direction (a stalled link:
  TCP never notices, MQTT only through keep-alive); ``resume()`` lets the bytes through again.
- ``pause_replies()``: only the target's bytes to the client are held (a PUBLISH gets through,
  its PUBACK does not), until ``resume()`` or a ``cut()``, which drops them.
- ``cut()``: every connection is reset and new ones are refused (a link that is down);
  ``restore()`` accepts connections again.
- ``flap(times, down_s, up_s)``: cut and restore, repeatedly.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

T = TypeVar("T")
_CHUNK = 65536


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = 0
        self.connections_accepted = 0
        self.connections_refused = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="proxy")
        self._server: asyncio.Server | None = None
        self._open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._flowing: asyncio.Event | None = None
        self._replies_flowing: asyncio.Event | None = None
        self._refusing = False

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> Self:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(Exception):
            self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._replies_flowing = asyncio.Event()
        self._replies_flowing.set()
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        self._reset_all()

    # -- control (from any thread) ---------------------------------------------------
    def pause(self) -> None:
        self._call(self._set_flowing(False))

    def resume(self) -> None:
        self._call(self._set_flowing(True))

    def pause_replies(self) -> None:
        self._call(self._set_replies_flowing(False))

    def cut(self) -> None:
        self._call(self._cut())

    def restore(self) -> None:
        self._call(self._restore())

    def flap(self, times: int, down_s: float, up_s: float) -> None:
        for _ in range(times):
            self.cut()
            time.sleep(down_s)
            self.restore()
            time.sleep(up_s)

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
            await self._set_replies_flowing(True)
        else:
            self._flowing.clear()

    async def _set_replies_flowing(self, flowing: bool) -> None:
        assert self._replies_flowing is not None
        if flowing:
            self._replies_flowing.set()
        else:
            self._replies_flowing.clear()

    async def _cut(self) -> None:
        self._refusing = True
        self._reset_all()

    async def _restore(self) -> None:
        self._refusing = False
        await self._set_flowing(True)

    def _reset_all(self) -> None:
        for a, b in list(self._open):
            for w in (a, b):
                _reset(w)
        self._open.clear()

    # -- forwarding ------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            self.connections_refused += 1
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        if self._refusing:  # cut while the upstream connection was being made: refuse it too
            self.connections_refused += 1
            for w in (writer, up_writer):
                _reset(w)
            return
        self.connections_accepted += 1
        for w in (writer, up_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = (writer, up_writer)
        self._open.add(pair)
        try:
            assert self._replies_flowing is not None
            await asyncio.gather(
                self._pump(reader, up_writer, self._flowing),
                self._pump(up_reader, writer, self._replies_flowing),
            )
        finally:
            self._open.discard(pair)
            for w in pair:
                with contextlib.suppress(Exception):
                    w.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: asyncio.Event | None,
    ) -> None:
        assert self._flowing is not None and direction is not None
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                await self._flowing.wait()
                await direction.wait()
                if writer.is_closing():
                    break
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(Exception):
            writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, as a link that breaks does, not with an orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        writer.transport.abort()
