"""Whether paho's private members are the ones the fast path was built on, checked at import.

:class:`~edgewise.mqtt.client.DirectClient` overrides private methods of paho's ``Client`` and
reads and writes its private attributes; the session itself touches a few
(:mod:`edgewise.mqtt.connection`, :mod:`edgewise.mqtt.socket_driver`). paho promises nothing
about them, and ``paho-mqtt>=2.2,<3`` lets a minor upgrade change them. So, once, at import:

* the installed paho's version must be one the fast path was verified with
  (:data:`VERIFIED_VERSIONS`: the whole test suite ran on it);
* every method overridden or called must exist with the parameters it is called with
  (``inspect.signature``), every attribute used must be one paho's ``Client`` code uses, and
  paho must still call each overridden method where the override expects (the names a
  method's code object uses).

Anything else gets plain paho: the session makes ``paho.Client``, not ``DirectClient``, and
leaves paho's keep-alive bookkeeping alone while reading is paused; a logged warning names the
paho version and what was missing (docs/adr/0079-paho-guard.md). ``EDGEWISE_PAHO_FAST=0``
forces plain paho; ``EDGEWISE_PAHO_FAST=1`` takes the fast path on an unverified version
whose members all check out (not on one that lacks any).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as paho

log = logging.getLogger(__name__)

ENV_VAR: Final = "EDGEWISE_PAHO_FAST"

VERIFIED_VERSIONS: Final = frozenset({"2.2.0"})
"""paho-mqtt versions the whole test suite ran on with the fast path."""

METHODS: Final[dict[str, tuple[str, ...]]] = {
    # overridden by DirectClient
    "_handle_publish": ("self",),
    "_handle_on_message": ("self", "message"),
    "_handle_pubackcomp": ("self", "cmd"),
    "_update_inflight": ("self",),
    "_messages_reconnect_reset_out": ("self",),
    "_sock_recv": ("self", "bufsize"),
    "_sock_send": ("self", "buf"),
    "_packet_write": ("self",),
    "_sock_close": ("self",),
    "publish": ("self", "topic", "payload", "qos", "retain", "properties"),
    "message_callback_add": ("self", "sub", "callback"),
    # called by DirectClient
    "_send_publish": (
        "self",
        "mid",
        "topic",
        "payload",
        "qos",
        "retain",
        "dup",
        "info",
        "properties",
    ),
    "_send_puback": ("self", "mid"),
    "_do_on_publish": ("self", "mid", "reason_code", "properties"),
    "_easy_log": ("self", "level", "fmt", "args"),
}
"""Each private (or overridden) method of ``paho.Client`` used, with its parameters' names."""

ATTRIBUTES: Final = (
    "_sock",
    "_out_packet",
    "_msgtime_mutex",
    "_last_msg_out",
    "_out_messages",
    "_inflight_messages",
    "_max_inflight_messages",
    "_protocol",
    "_in_packet",
    "_manual_ack",
    "_userdata",
    "_out_message_mutex",
    "_last_bytes_received",
    "_ping_t",
)
"""Private attributes of ``paho.Client`` read or written (by DirectClient and the session)."""

CALLS: Final = (
    ("_packet_handle", "_handle_publish"),
    ("_packet_handle", "_handle_pubackcomp"),
    ("_handle_publish", "_handle_on_message"),
    ("_handle_pubackcomp", "_do_on_publish"),
    ("_do_on_publish", "_update_inflight"),
    ("_messages_reconnect_reset", "_messages_reconnect_reset_out"),
    ("_packet_read", "_sock_recv"),
    ("loop_write", "_packet_write"),
    ("_packet_write", "_sock_send"),
    ("_reset_sockets", "_sock_close"),
)
"""(caller, callee): paho's ``caller`` must still call the overridden ``callee``."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether the fast path is taken, and why not."""

    fast: bool
    paho_version: str
    missing: tuple[str, ...] = ()
    """The members that are not what the fast path expects (empty: all check out)."""
    forced: bool = False
    """Decided by :data:`ENV_VAR`, not by the checks alone."""


def paho_version() -> str:
    try:
        return importlib.metadata.version("paho-mqtt")
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(paho, "__version__", "unknown"))


def _code_names(fn: Any) -> set[str]:
    code = getattr(fn, "__code__", None)
    return set(code.co_names) if code is not None else set()


def missing_members(cls: type[Any] = paho.Client) -> tuple[str, ...]:
    """What of :data:`METHODS`, :data:`ATTRIBUTES` and :data:`CALLS` ``cls`` lacks, in words."""
    missing: list[str] = []
    for name, params in METHODS.items():
        fn = getattr(cls, name, None)
        if not callable(fn):
            missing.append(f"Client.{name}")
            continue
        try:
            have = tuple(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            missing.append(f"Client.{name} (no signature)")
            continue
        if have != params:
            missing.append(f"Client.{name}{_shown(have)} (expected {_shown(params)})")
    used: set[str] = set()
    for klass in cls.__mro__[:-1]:  # all but object
        for member in vars(klass).values():
            fn = member.fget if isinstance(member, property) else member
            used |= _code_names(fn)
    missing += [f"Client.{name} (attribute)" for name in ATTRIBUTES if name not in used]
    for caller, callee in CALLS:
        if callee not in _code_names(getattr(cls, caller, None)):
            missing.append(f"Client.{caller} calling {callee}")
    return tuple(missing)


def _shown(params: tuple[str, ...]) -> str:
    return "(" + ", ".join(params) + ")"


def decide(
    version: str,
    missing: tuple[str, ...],
    env: str | None,
    warn: Callable[..., None] = log.warning,
) -> Verdict:
    """The fast path, or plain paho with a warning that says why."""
    if env == "0":
        warn("%s=0: plain paho-mqtt %s (no fast path)", ENV_VAR, version)
        return Verdict(False, version, missing, forced=True)
    if missing:
        warn(
            "paho-mqtt %s lacks what the MQTT fast path overrides or uses: %s; using plain paho"
            " (slower; verified versions: %s)",
            version,
            "; ".join(missing),
            ", ".join(sorted(VERIFIED_VERSIONS)),
        )
        return Verdict(False, version, missing)
    if version in VERIFIED_VERSIONS:
        return Verdict(True, version)
    if env == "1":
        warn("%s=1: MQTT fast path on paho-mqtt %s, not a verified version", ENV_VAR, version)
        return Verdict(True, version, forced=True)
    warn(
        "paho-mqtt %s is not a version the MQTT fast path was verified with (%s); using plain"
        " paho (slower; %s=1 takes the fast path anyway, its members all check out)",
        version,
        ", ".join(sorted(VERIFIED_VERSIONS)),
        ENV_VAR,
    )
    return Verdict(False, version)


VERDICT: Verdict = decide(paho_version(), missing_members(), os.environ.get(ENV_VAR))
"""Decided once, at import. The session reads it each time it makes a client."""
