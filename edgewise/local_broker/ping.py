"""Is a broker accepting MQTT sessions? One real CONNECT/CONNACK exchange over a raw socket.

A listening TCP socket is not enough (mosquitto binds before it has finished starting, and a
stray process may hold the port), so readiness means: the peer answered an MQTT 3.1.1 CONNECT
with a CONNACK that accepts the session.
"""

from __future__ import annotations

import os
import socket
import struct

_CONNACK = 0x20
_DISCONNECT = b"\xe0\x00"


class PingError(OSError):
    """The peer spoke, but not like an MQTT broker that accepts an anonymous 3.1.1 client."""


def _connect_packet(client_id: str, keepalive_s: int) -> bytes:
    cid = client_id.encode()
    variable = b"\x00\x04MQTT" + bytes([4, 0x02]) + struct.pack("!H", keepalive_s)
    body = variable + struct.pack("!H", len(cid)) + cid
    if len(body) > 127:
        raise ValueError("client id too long for a one-byte remaining length")
    return bytes([0x10, len(body)]) + body


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise PingError(f"connection closed after {len(buf)} of {n} CONNACK bytes")
        buf += chunk
    return buf


def mqtt_ping(host: str, port: int, timeout_s: float = 1.0) -> int:
    """Send one MQTT 3.1.1 CONNECT (clean session) and return the CONNACK return code.

    Returns 0 when the broker accepted the session (the connection is then closed with a
    DISCONNECT); raises :class:`OSError` (``ConnectionRefusedError``, ``TimeoutError``,
    :class:`PingError`, ...) when no CONNACK arrived within ``timeout_s``.
    """
    client_id = f"edgewise-ping-{os.getpid()}-{os.urandom(3).hex()}"
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(_connect_packet(client_id, keepalive_s=10))
        header = _read_exact(sock, 2)
        if header[0] != _CONNACK or header[1] != 2:
            raise PingError(f"expected a CONNACK, got bytes {header.hex()}")
        _flags, return_code = _read_exact(sock, 2)
        if return_code == 0:
            sock.sendall(_DISCONNECT)
        return return_code


def accepts_mqtt(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True when :func:`mqtt_ping` got a CONNACK accepting the session."""
    try:
        return mqtt_ping(host, port, timeout_s) == 0
    except OSError:
        return False
