"""How every ``edgewise`` command reaches its broker: one place for the URL, the credentials, TLS
and what a command says when the broker is not there.

The options (each command that connects takes them all; a flag wins over its variable)::

    --broker, -b URL      EDGEWISE_BROKER               mqtt://HOST[:PORT] (port 1883), or
                                                        mqtts://HOST[:PORT] (TLS, port 8883)
    --username NAME       EDGEWISE_MQTT__USERNAME       the MQTT username
    --password-file PATH  EDGEWISE_MQTT__PASSWORD_FILE  a file holding the password
                          EDGEWISE_MQTT__PASSWORD       (or the password itself)
    --tls-ca PATH         EDGEWISE_MQTT__TLS_CA_FILE    the CA the broker's certificate must
                                                        chain to; it turns TLS on (mqtts://
                                                        without it: the system's CAs)

The variables are the ones the node's ``[mqtt]`` section reads. Every command that connects reads
``EDGEWISE_BROKER``, the services (``node``, ``worker``) and ``demo`` too: a flag wins over the
variable, which wins over a service's ``[mqtt]`` settings. There is no password flag: a
command line is visible to every user of the machine (docs/security.md).

Ordinary trouble (the broker unreachable, TLS refused, the credentials or a subscription
refused) ends a command with one line naming the broker and the reason, and exit code 2
(:class:`BrokerTrouble`, :func:`run`): a command gives up at the first failed attempt instead of
retrying like the services do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from edgewise.cli.credentials import _ENV

if TYPE_CHECKING:
    from edgewise.mqtt import Inbound, MqttConfig, MqttSession

T = TypeVar("T")
err = Console(stderr=True)

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
CONNECT_TIMEOUT_S = 10.0
"""A command's TCP/TLS connect and CONNACK timeout (each, per attempt)."""

_BROKER_HELP = "Broker URL: mqtt://HOST[:PORT] (port 1883) or mqtts://HOST[:PORT] (TLS, port 8883)."
_USERNAME_HELP = "MQTT username."
_PASSWORD_FILE_HELP = (
    "File holding the MQTT password (surrounding whitespace stripped). There is no password"
    " flag; the password itself may come from EDGEWISE_MQTT__PASSWORD."
)
_TLS_CA_HELP = (
    "CA certificate file (PEM) the broker's certificate must chain to; turns TLS on."
    " mqtts:// without it checks against the system's CAs."
)


def broker_option(help: str = _BROKER_HELP, *, envvar: str | None = "EDGEWISE_BROKER") -> Any:
    return typer.Option("--broker", "-b", help=help, envvar=envvar)


def username_option(help: str = _USERNAME_HELP, *, envvar: str | None = _ENV["username"]) -> Any:
    return typer.Option("--username", help=help, envvar=envvar)


def password_file_option(
    help: str = _PASSWORD_FILE_HELP, *, envvar: str | None = _ENV["password_file"]
) -> Any:
    return typer.Option("--password-file", help=help, envvar=envvar)


def tls_ca_option(help: str = _TLS_CA_HELP, *, envvar: str | None = _ENV["tls_ca_file"]) -> Any:
    return typer.Option("--tls-ca", help=help, envvar=envvar)


BrokerOpt = Annotated[str, broker_option()]
UsernameOpt = Annotated[str | None, username_option()]
PasswordFileOpt = Annotated[Path | None, password_file_option()]
TlsCaOpt = Annotated[Path | None, tls_ca_option()]

# For the services (node, worker): flags laid over their [mqtt] settings (service_mqtt), which
# read the environment themselves. The broker: --broker, else EDGEWISE_BROKER, else [mqtt] (the
# config file and its EDGEWISE_*MQTT__* variables), as for every other command.
ServiceBrokerOpt = Annotated[
    str | None,
    broker_option(
        "Override mqtt.host/port (and mqtt.tls): mqtt://HOST[:PORT], or mqtts://HOST[:PORT]"
        " (TLS, port 8883). Precedence: this flag, EDGEWISE_BROKER, then \\[mqtt].",
    ),
]
ServiceUsernameOpt = Annotated[str | None, username_option("Override mqtt.username.", envvar=None)]
ServicePasswordFileOpt = Annotated[
    Path | None,
    password_file_option(
        "Override mqtt.password_file (and mqtt.password): a file holding the MQTT password."
        " There is no password flag.",
        envvar=None,
    ),
]
ServiceTlsCaOpt = Annotated[
    Path | None,
    tls_ca_option(
        "Override mqtt.tls_ca_file: the CA certificate (PEM) the broker's certificate must"
        " chain to; turns TLS on.",
        envvar=None,
    ),
]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on one line (verbatim: no markup, no wrapping) and exit."""
    err.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


class BrokerTrouble(Exception):
    """A command could not do its work with the broker; ``str()`` is the line to print."""


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Broker:
    """Where a command connects and how: ``url`` (never with credentials) and the settings."""

    url: str
    mqtt: MqttConfig

    @property
    def who(self) -> str:
        """``URL`` or ``URL as USERNAME``, for messages (never a password)."""
        user = self.mqtt.username
        return f"{self.url} as {user}" if user else self.url


def mqtt_settings(
    url: str | None,
    username: str | None,
    password_file: Path | None,
    tls_ca: Path | None,
    *,
    password_env: bool = True,
    check_username: bool = True,
) -> tuple[str | None, dict[str, Any]]:
    """``(canonical url, MqttConfig fields)`` from a command's options; ``fail`` (exit 2) on a
    bad URL, an unreadable password or CA file, or a password without a username.

    Only the fields given are in the dict (``url`` None: no host, port or TLS), so a service
    can lay them over its configuration. ``password_env``: the password may come from
    ``EDGEWISE_MQTT__PASSWORD`` when no password file is given. ``check_username``: refuse a
    password without a username (a service's username may come from its configuration).
    """
    from edgewise.local_broker import parse_broker

    fields: dict[str, Any] = {}
    shown: str | None = None
    if url is not None:
        try:
            where = parse_broker(url)
        except ValueError as exc:
            fail(f"--broker: {exc}")
        shown = where.url
        fields.update(host=where.host, port=where.port, tls=where.tls)
    if username:
        fields["username"] = username
    if password_file is not None:
        try:
            secret = password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"--password-file {password_file}: cannot read it ({_os_reason(exc)})")
        if not secret:
            fail(f"--password-file {password_file} is empty")
        fields.update(password_file=password_file, password=None)
    elif password_env and os.environ.get(_ENV["password"]):
        fields["password"] = os.environ[_ENV["password"]]
    has_password = fields.get("password_file") or fields.get("password")
    if check_username and has_password and not username:
        fail(
            "a password (--password-file, EDGEWISE_MQTT__PASSWORD_FILE or"
            " EDGEWISE_MQTT__PASSWORD) needs --username (or EDGEWISE_MQTT__USERNAME)"
        )
    if tls_ca is not None:
        try:
            ssl.create_default_context(cafile=str(tls_ca))
        except (OSError, ssl.SSLError) as exc:
            fail(f"--tls-ca {tls_ca}: not a readable PEM CA certificate ({_os_reason(exc)})")
        fields["tls_ca_file"] = tls_ca
        if shown is not None and not fields.get("tls"):
            shown = "mqtts" + shown.removeprefix("mqtt")  # a CA turns TLS on (as in [mqtt])
    return shown, fields


def service_mqtt(
    mqtt: MqttConfig,
    broker: str | None,
    username: str | None,
    password_file: Path | None,
    tls_ca: Path | None,
) -> MqttConfig:
    """A service's ``[mqtt]`` settings with the flags given laid over them."""
    _, fields = mqtt_settings(
        broker, username, password_file, tls_ca, password_env=False, check_username=False
    )
    return mqtt.model_copy(update=fields) if fields else mqtt


def broker_settings(
    url: str,
    username: str | None,
    password_file: Path | None,
    tls_ca: Path | None,
    **config: Any,
) -> Broker:
    """The broker of a command (``--broker``, ``--username``, ``--password-file``, ``--tls-ca``
    and their environment variables), or ``fail`` with one line naming what is wrong."""
    from edgewise.mqtt import MqttConfig

    shown, fields = mqtt_settings(url, username, password_file, tls_ca)
    assert shown is not None
    config.setdefault("connect_timeout_s", CONNECT_TIMEOUT_S)
    return Broker(url=shown, mqtt=MqttConfig(**fields, **config))


# ----------------------------------------------------------------------------- reasons
_REFUSED_CREDENTIALS = {4, 5, 0x86, 0x87, 0x8C}
"""CONNACK codes for credentials (MQTT 3.1.1: 4 bad user name or password, 5 not authorised;
MQTT 5: 0x86, 0x87, 0x8C bad authentication method)."""


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__
    return seen


def reason(exc: BaseException, broker: Broker) -> str:
    """Why ``exc`` happened, in words, with what to check (one line, never a password)."""
    from edgewise.mqtt import ConnectFailed, Disconnected, PublishRejected, SubscribeRefused

    user = broker.mqtt.username
    for e in _chain(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            return (
                f"TLS: the broker's certificate was not accepted ({e.verify_message}); check"
                " --tls-ca (the CA that signed it) and that the host in --broker is a name on"
                " the certificate"
            )
        if isinstance(e, ssl.SSLError):
            return f"TLS handshake failed ({e.reason or e}); is that port a TLS listener?"
        if isinstance(e, socket.gaierror):
            return f"cannot resolve host {broker.mqtt.host!r} ({e.strerror or e})"
        if isinstance(e, ConnectionRefusedError):
            return "connection refused: nothing listens there (is the broker running? the port?)"
        if isinstance(e, ConnectionResetError):
            return "the connection was reset by the broker" + (
                " (TLS to a plain MQTT port? use mqtt://)" if broker.mqtt.uses_tls else ""
            )
        if isinstance(e, SubscribeRefused | PublishRejected):
            who = f"the account {user!r}" if user else "an anonymous client"
            may = "read" if isinstance(e, SubscribeRefused) else "write"
            return f"{e}; {who} may not {may} that topic (the broker's ACL)"
        if isinstance(e, ConnectFailed) and e.reason_code in _REFUSED_CREDENTIALS:
            return (
                f"not authorised: {e} (check --username and --password-file"
                + ("" if user else "; none was given")
                + ")"
            )
        if isinstance(e, ConnectFailed) and e.__cause__ is None:
            text = str(e)
            if "before its CONNACK" in text and not broker.mqtt.uses_tls:
                text += " (a TLS port? use mqtts://HOST:PORT)"
            return text
        if isinstance(e, Disconnected):
            return f"the connection dropped ({e})"
        if isinstance(e, OSError):
            return _os_reason(e)
    return str(exc) or type(exc).__name__


# ----------------------------------------------------------------------------- sessions
@contextlib.contextmanager
def _quiet_first_connect() -> Iterator[None]:
    """The session's own warnings while a command connects ("cannot connect …; retrying",
    protocol fallbacks) would come before the one line that says why: hold them back."""
    logger = logging.getLogger("edgewise.mqtt")
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def trouble(exc: BaseException, broker: Broker) -> BrokerTrouble:
    """``exc`` (an :class:`~edgewise.mqtt.MqttError`) as the line a command ends with."""
    from edgewise.mqtt import ConnectFailed

    if isinstance(exc, ConnectFailed):
        return BrokerTrouble(f"cannot connect to {broker.who}: {reason(exc, broker)}")
    return BrokerTrouble(f"{broker.who}: {reason(exc, broker)}")


async def connected(s: MqttSession, broker: Broker) -> None:
    """Wait until ``s`` is connected, or :class:`BrokerTrouble` at its first failed attempt."""
    from edgewise.mqtt import MqttError

    timeout_s = 2 * broker.mqtt.connect_timeout_s + 5  # MQTT 5, then 3.1.1 once, each timed
    with _quiet_first_connect():
        try:
            await s.wait_connected_or_failed(timeout_s)
        except TimeoutError:
            last = f" (last error: {s.last_error})" if s.last_error else ""
            raise BrokerTrouble(
                f"cannot connect to {broker.who}: no connection within {timeout_s:g} s{last}"
            ) from None
        except MqttError as exc:
            raise trouble(exc, broker) from None


@contextlib.asynccontextmanager
async def session(
    broker: Broker,
    *,
    purpose: str,
    on_message: Callable[[Inbound], None] | None = None,
    filters: Iterable[str] = (),
    client_id: str | None = None,
) -> AsyncIterator[MqttSession]:
    """A connected session for a command, subscribed to ``filters`` (each confirmed by the
    broker), or :class:`BrokerTrouble` with the reason. Errors of the session inside the block
    (a publish refused, the connection lost) become :class:`BrokerTrouble` too."""
    from edgewise.mqtt import MqttError, MqttSession

    cid = client_id or f"edgewise-{purpose}-{os.getpid()}-{os.urandom(3).hex()}"
    async with MqttSession(
        broker.mqtt, client_id=cid, on_message=on_message, manual_ack=False, persistent=False
    ) as s:
        await connected(s, broker)
        try:
            for f in filters:
                await s.subscribe_confirmed(f)
            yield s
        except MqttError as exc:
            raise trouble(exc, broker) from None


async def publish(
    s: MqttSession, broker: Broker, topic: str, payload: bytes, *, retain: bool = False
) -> None:
    """Publish at QoS 1 and wait for the broker's PUBACK, or :class:`BrokerTrouble` naming the
    topic and the reason (refused by the broker's ACL, the connection lost)."""
    from edgewise.mqtt import MqttError

    try:
        await s.publish(topic, payload, qos=1, retain=retain)
    except MqttError as exc:
        raise BrokerTrouble(
            f"cannot publish to {topic} on {broker.who}: {reason(exc, broker)}"
        ) from None


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``; :class:`BrokerTrouble` ends the command with its line, exit 2;
    Ctrl-C ends it quietly with exit 130 (the shell's convention), not click's "Aborted!"."""
    try:
        return asyncio.run(main)
    except BrokerTrouble as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
