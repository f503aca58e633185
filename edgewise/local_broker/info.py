"""Broker addresses: :class:`BrokerInfo`, ``mqtt://`` and ``mqtts://`` URL parsing, free loopback
ports."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

BrokerKind = Literal["mosquitto", "embedded", "external"]

DEFAULT_MQTT_PORT = 1883
DEFAULT_MQTTS_PORT = 8883
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class BrokerInfo:
    """Where a broker listens and what started it.

    ``kind`` is ``"mosquitto"`` for a :class:`~edgewise.local_broker.MosquittoProcess`,
    ``"embedded"``
    for an in-process amqtt :class:`~edgewise.local_broker.EmbeddedBroker` (MQTT 3.1.1 only) and
    ``"external"`` for a broker edgewise did not start (e.g. from ``--broker mqtt://...``).
    """

    host: str
    port: int
    kind: BrokerKind

    @property
    def url(self) -> str:
        """``mqtt://host:port``; IPv6 literals are bracketed."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    @classmethod
    def from_url(cls, url: str, kind: BrokerKind = "external") -> BrokerInfo:
        """Build from an ``mqtt://host[:port]`` URL (see :func:`parse_broker_url`)."""
        host, port = parse_broker_url(url)
        return cls(host=host, port=port, kind=kind)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that nothing listens on right now.

    The kernel picks it (bind to port 0); the socket is closed before returning, so another
    process could in principle take it first. :class:`~edgewise.local_broker.MosquittoProcess` and
    :class:`~edgewise.local_broker.EmbeddedBroker` retry with a new port when that happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def parse_broker_url(url: str) -> tuple[str, int]:
    """Split ``mqtt://host[:port]`` into ``(host, port)``; the port defaults to 1883.

    Anything else (another scheme such as ``mqtts://`` or ``tcp://``, no host, credentials,
    a path, query or fragment, a non-numeric or out-of-range port) raises :class:`ValueError`
    naming the problem. IPv6 hosts are written bracketed (``mqtt://[::1]:1883``) and returned
    without brackets. :func:`parse_broker` also takes ``mqtts://``.
    """
    broker = parse_broker(url, schemes=("mqtt",))
    return broker.host, broker.port


@dataclass(frozen=True, slots=True)
class BrokerUrl:
    """A broker as a command line names it: ``mqtt://host[:port]`` or ``mqtts://host[:port]``."""

    host: str
    port: int
    tls: bool
    """``mqtts://``: TLS, the broker's certificate checked (against ``--tls-ca`` or the system's
    CAs) and its name matched to ``host``."""

    @property
    def url(self) -> str:
        """``mqtt[s]://host:port``; IPv6 literals are bracketed."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def parse_broker(url: str, *, schemes: tuple[str, ...] = ("mqtt", "mqtts")) -> BrokerUrl:
    """``mqtt://host[:port]`` (port 1883 by default) or ``mqtts://host[:port]`` (TLS, port 8883
    by default); anything else raises :class:`ValueError` naming the problem, never quoting a
    password the URL may carry."""
    if not isinstance(url, str):
        raise ValueError(f"broker URL must be a string like mqtt://host:1883, got {url!r}")
    text = url.strip()
    url = _without_credentials(text)  # every message below quotes it: never a password
    expected = f"expected {' or '.join(f'{s}://host[:port]' for s in schemes)}"
    if "://" not in text:
        raise ValueError(f"broker URL {url!r} has no scheme; {expected}")
    parts = urlsplit(text)
    if parts.scheme not in schemes:
        why = f"only plain mqtt:// is supported ({expected})" if schemes == ("mqtt",) else expected
        raise ValueError(f"broker URL {url!r} uses scheme {parts.scheme!r}; {why}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"broker URL {url!r} must not carry credentials; {expected}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker URL {url!r} must not have a path, query or fragment; {expected}")
    host = parts.hostname
    if not host:
        raise ValueError(f"broker URL {url!r} has no host; {expected}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"broker URL {url!r} has an invalid port ({exc}); {expected}") from None
    tls = parts.scheme == "mqtts"
    if port is None:
        if parts.netloc.endswith(":"):
            raise ValueError(f"broker URL {url!r} has an empty port; {expected}")
        port = DEFAULT_MQTTS_PORT if tls else DEFAULT_MQTT_PORT
    if not 1 <= port <= 65535:
        raise ValueError(f"broker URL {url!r} has port {port}, outside 1-65535")
    return BrokerUrl(host=host, port=port, tls=tls)


def _without_credentials(url: str) -> str:
    """``url`` with any ``user:password@`` before the host shown as ``***@``."""
    return re.sub(r"^([^/@]*//)?[^/?#@]*@", lambda m: (m.group(1) or "") + "***@", url)
