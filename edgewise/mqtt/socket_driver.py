"""The socket of a paho client, driven from the asyncio event loop (no network thread).

paho does the protocol; :class:`SocketDriver` tells it when to read and write: it registers
the socket with the loop, reads every packet buffered at each wakeup, joins the writes of one
turn of the loop, pauses reading for backpressure (keeping the keep-alive meanwhile) and runs
paho's housekeeping once a second. One driver serves a session's connections one after
another: :meth:`SocketDriver.attach` hands it each new client, :meth:`SocketDriver.close` lets
the current one go (docs/adr/0006, docs/adr/0072-buffered-socket-io.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

from edgewise.mqtt.client import DirectClient
from edgewise.mqtt.stats import SessionStats

READS_PER_WAKEUP = 256
"""Most ``loop_read`` calls for one readable event: buffered packets are read in one go (see
``SocketDriver._read``), and then the loop's other tasks get their turn."""


class SocketDriver:
    """Reads and writes the current client's socket on the event loop."""

    def __init__(self, stats: SessionStats) -> None:
        self.stats = stats
        self.client: paho.Client | None = None
        """The client of the current (or last) connection; None once closed."""
        self.reading_paused = False
        self.bytes_before = 0
        """Bytes received on the connections closed so far."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._poller = select.poll()
        self._poll_sock: Any = None
        self._writes_due: set[paho.Client] = set()
        """Clients whose packets are written at the next turn of the loop."""

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Drive sockets on ``loop`` (the running loop, called from its thread)."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def attach(self, client: paho.Client) -> None:
        """Make ``client`` the current one: its socket is driven from its connect on."""
        self.client = client
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write

    @property
    def bytes_received(self) -> int:
        """Bytes read from the broker since the start, over every connection."""
        client = self.client
        now = client.bytes_received if isinstance(client, DirectClient) else 0
        return self.bytes_before + now

    def close(self) -> None:
        """Let the current client go: its socket leaves the loop and is closed."""
        client = self.client
        self.client = None
        if client is None:
            return
        if isinstance(client, DirectClient):
            self.bytes_before += client.bytes_received
        client.on_disconnect = None
        client.on_socket_close = None
        sock = client.socket()
        if sock is None:
            return
        with contextlib.suppress(Exception):
            if self._loop is not None:
                self._loop.remove_reader(sock)
                self._loop.remove_writer(sock)
            sock.close()

    def tick(self) -> None:
        """paho's housekeeping (keep-alive, timeouts), once a second."""
        client = self.client
        if client is not None:
            if self.reading_paused:
                self._keepalive_while_paused(client)
            client.loop_misc()

    def _keepalive_while_paused(self, client: paho.Client) -> None:
        """Keep the keep-alive of a connection whose reading is paused (ADR 0076).

        paho pings when nothing was written for a keep-alive, and only while no PINGRESP is
        awaited; it closes the connection a keep-alive after a PINGREQ whose PINGRESP it has not
        read. Paused, we read nothing: the PINGRESP waits behind the messages we hold back, so
        paho would ping once, stop pinging (the broker then drops us after 1.5 keep-alives of
        silence, if we have nothing else to send) and close the connection itself. While bytes
        wait unread (in the socket or read ahead), the broker has been heard from: paho is told
        so, and no PINGRESP is awaited any more, so it pings on schedule and keeps the
        connection. A silent socket gets no such credit: paho's own check applies to it; nor
        does plain paho (edgewise.mqtt.paho_guard), whose keep-alive bookkeeping may not be
        what this writes: a connection paused for longer than a keep-alive may then be lost.
        """
        sock = client.socket()
        if sock is None or not isinstance(client, DirectClient):
            return
        waiting = client.buffered() > 0
        if not (waiting or self._readable(sock)):
            return
        with client._msgtime_mutex:
            client._last_bytes_received = paho.time_func()
        client._ping_t = 0
        self.stats.paused_keepalives += 1

    # ------------------------------------------------------------------ backpressure
    def pause_reading(self) -> None:
        """Stop reading from the broker until :meth:`resume_reading` (or the next connection)."""
        client = self.client
        sock = client.socket() if client is not None else None
        if self.reading_paused or sock is None or self._loop is None:
            return
        self.reading_paused = True
        self.stats.read_pauses += 1
        self._loop.remove_reader(sock)

    def resume_reading(self) -> None:
        client = self.client
        if not self.reading_paused:
            return
        self.reading_paused = False
        sock = client.socket() if client is not None else None
        if client is not None and sock is not None and self._loop is not None:
            self._loop.add_reader(sock, self._read, client)
            self._read_buffered_soon(client)

    # ------------------------------------------------------------------ paho's socket callbacks
    def _in_loop(self, fn: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert self._loop is not None
        self.reading_paused = False  # a new connection must read its CONNACK
        self._in_loop(self._loop.add_reader, sock, self._read, client)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._in_loop(self._loop.remove_reader, sock)
        self._in_loop(self._loop.remove_writer, sock)

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho has packets to send. They are written at the next turn of the loop, without
        # asking the selector first (two epoll_ctl calls and a wait per publish otherwise):
        # the socket almost always takes them, and the publishes of one turn go out together.
        # Only if it cannot take them all does the loop wait for it to become writable.
        self._in_loop(self._write_soon, client, sock)

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._in_loop(self._loop.remove_writer, sock)

    # ------------------------------------------------------------------ writing
    def _write_soon(self, client: paho.Client, sock: Any) -> None:
        if client in self._writes_due:
            return
        self._writes_due.add(client)
        assert self._loop is not None
        self._loop.call_soon(self._write_due, client, sock)

    def _write_due(self, client: paho.Client, sock: Any) -> None:
        self._writes_due.discard(client)
        if client is not self.client:
            self._drop_stale(client)
            return
        current = client.socket()
        if current is None or current is not sock:
            return  # closed (or replaced) meanwhile
        client.loop_write()
        if client.want_write() and client.socket() is current and self._loop is not None:
            with contextlib.suppress(ValueError, OSError):  # closed meanwhile
                self._loop.add_writer(current, self._write, client)

    def _write(self, client: paho.Client) -> None:
        if client is self.client:
            client.loop_write()
        else:
            self._drop_stale(client)

    # ------------------------------------------------------------------ reading
    def _read(self, client: paho.Client) -> None:
        """Read what the socket holds, not one packet per wakeup.

        paho's ``loop_read`` reads ``len(out_messages) + len(in_messages)`` packets, at least
        one: a client that publishes nothing (the sensors' connection when the node has a
        separate uplink) read one frame per event-loop iteration, so each frame paid a whole
        iteration and the micro-batcher saw batches of one or two (bench/outage.py: 3,400
        frames/s against 8,000 with one connection). Packets wait in the socket or, read
        ahead, in the client (:meth:`DirectClient.buffered`): reading goes on while either
        holds some, and bytes still buffered when this wakeup's reads are used up (or when
        reading resumes) are read at the next turn of the loop, since the socket will not wake
        it for them (ADR 0006, ADR 0072).
        """
        if client is not self.client:
            self._drop_stale(client)
            return
        self.stats.read_wakeups += 1
        buffered = client.buffered if isinstance(client, DirectClient) else None
        for _ in range(READS_PER_WAKEUP):
            client.loop_read()
            if self.reading_paused or client is not self.client:
                return  # the handler asked for backpressure, or the connection is gone
            if buffered is not None and buffered():
                continue
            sock = client.socket()
            if sock is None or not self._readable(sock):
                return
        self._read_buffered_soon(client)

    def _read_buffered_soon(self, client: paho.Client) -> None:
        """Read at the next turn what ``client`` has buffered (its socket may be drained)."""
        if isinstance(client, DirectClient) and client.buffered() and self._loop is not None:
            self._loop.call_soon(self._read, client)

    def _readable(self, sock: Any) -> bool:
        """Bytes wait to be read: in a TLS (or WebSocket) layer's buffer, or in the kernel's."""
        pending = getattr(sock, "pending", None)
        if pending is not None and pending():
            return True
        try:
            if self._poll_sock is not sock:  # one poll object per connection, not per packet
                self._poller = select.poll()
                self._poller.register(sock, select.POLLIN)
                self._poll_sock = sock
            return bool(self._poller.poll(0))
        except (OSError, ValueError):  # closed meanwhile: the next loop_read reports it
            return False

    def _drop_stale(self, client: paho.Client) -> None:
        """Close the socket of a connect given up on (it finished in the executor after
        connect_timeout_s): left registered, it would wake the loop on every iteration."""
        sock = client.socket()
        if sock is None or self._loop is None:
            return
        with contextlib.suppress(Exception):
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
            sock.close()
