"""``edgewise watch``: subscribe to topic filters and show what arrives, three ways.

- pretty (default): a header line per message and its decoded MessagePack/JSON payload;
- ``--json``: one JSON object per line, for ``jq`` and scripts, nothing truncated (see
  :func:`json_line`);
- ``--rate``: no messages, one line per topic filter every second with messages/s and bytes/s
  (for busy topics).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import msgspec
from paho.mqtt.client import topic_matches_sub
from rich.console import Console
from rich.markup import escape

from edgewise.cli.connect import Broker, err, session
from edgewise.mqtt import Inbound
from schemas import ContractError, Limits, decode_any

Mode = Literal["pretty", "json", "rate"]
_JSON = msgspec.json.Encoder()


def _now_iso() -> str:
    stamp = datetime.now(UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def json_line(msg: Inbound, *, limits: Limits, raw: bool = False) -> str:
    """One message as one line of JSON: ``ts`` (received, ISO 8601 UTC), ``topic``, ``qos``,
    ``retain``, ``size_bytes``, then ``payload`` (the decoded MessagePack/JSON; binary values
    as base64 strings) or, with ``raw``, an empty or undecodable payload, ``payload_base64``
    (and ``error`` saying why it was not decoded)."""
    doc: dict[str, object] = {
        "ts": _now_iso(),
        "topic": msg.topic,
        "qos": msg.qos,
        "retain": msg.retain,
        "size_bytes": len(msg.payload),
    }
    if raw or not msg.payload:
        doc["payload_base64"] = base64.b64encode(msg.payload).decode("ascii")
    else:
        try:
            doc["payload"] = decode_any(msg.payload, limits)
        except ContractError as exc:
            doc["payload_base64"] = base64.b64encode(msg.payload).decode("ascii")
            doc["error"] = f"{exc.reason}: {exc.detail}"
    # msgspec writes bytes as base64 and escapes every control character.
    return _JSON.encode(doc).decode("utf-8")


def render(msg: Inbound, console: Console, *, limits: Limits, raw: bool = False) -> None:
    stamp = datetime.now().strftime("%H:%M:%S.%f")[:-3]
    flags = " [yellow]retained[/]" if msg.retain else ""
    console.print(
        f"[dim]{stamp}[/] [bold cyan]{escape(msg.topic)}[/] qos={msg.qos}{flags}"
        f" {len(msg.payload)} B"
    )
    if raw:
        console.print(_shown(msg.payload[:512].decode("utf-8", "backslashreplace")), markup=False)
        return
    if not msg.payload:
        console.print("  [dim](empty payload)[/]")
        return
    try:
        text = _JSON.encode(decode_any(msg.payload, limits)).decode("utf-8")  # bytes: base64
    except ContractError as exc:
        head = msg.payload[:64].decode("utf-8", "backslashreplace")
        console.print(
            f"  [red]not decodable ({exc.reason}: {escape(exc.detail)})[/] {escape(_shown(head))}"
        )
        return
    console.print(f"  {escape(_shown(text))}", soft_wrap=True)


PRETTY_MAX_CHARS = 2000
"""What the human-readable mode prints of one payload; ``--json`` prints everything."""


def _shown(text: str) -> str:
    """``text`` with control characters escaped, cut at :data:`PRETTY_MAX_CHARS` (saying so)."""
    from edgewise.cli.logs import escape as escape_controls

    text = escape_controls(text)
    if len(text) <= PRETTY_MAX_CHARS:
        return text
    more = len(text) - PRETTY_MAX_CHARS
    return f"{text[:PRETTY_MAX_CHARS]} … ({more:,} more characters; --json prints everything)"


@dataclass
class RateCounter:
    """Messages and bytes per topic filter since the last report (a message counts under every
    filter it matches)."""

    filters: list[str]
    messages: dict[str, int] = field(default_factory=dict)
    size_bytes: dict[str, int] = field(default_factory=dict)
    since: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.reset(self.since)

    def reset(self, now: float) -> None:
        self.messages = dict.fromkeys(self.filters, 0)
        self.size_bytes = dict.fromkeys(self.filters, 0)
        self.since = now

    def add(self, msg: Inbound) -> None:
        for f in self.filters:
            if topic_matches_sub(_without_share(f), msg.topic):
                self.messages[f] += 1
                self.size_bytes[f] += len(msg.payload)

    def report(self, now: float) -> list[tuple[str, float, float]]:
        """``(filter, messages/s, bytes/s)`` since the last report; starts the next period."""
        span = max(now - self.since, 1e-9)
        rows = [(f, self.messages[f] / span, self.size_bytes[f] / span) for f in self.filters]
        self.reset(now)
        return rows


def _without_share(topic_filter: str) -> str:
    """``$share/GROUP/f`` → ``f`` (what the messages' topics match)."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else topic_filter
    return topic_filter


def _print_rates(rows: list[tuple[str, float, float]], console: Console, *, as_json: bool) -> None:
    if as_json:
        doc = {
            "ts": _now_iso(),
            "rates": [
                {"filter": f, "messages_per_s": round(m, 3), "bytes_per_s": round(b, 1)}
                for f, m, b in rows
            ],
        }
        console.out(_JSON.encode(doc).decode("utf-8"), highlight=False)
        return
    stamp = datetime.now().strftime("%H:%M:%S")
    for f, m, b in rows:
        console.print(
            f"[dim]{stamp}[/] [bold cyan]{escape(f)}[/] {m:,.1f} msg/s {b / 1000:,.1f} kB/s"
        )


async def watch(
    broker: Broker,
    filters: list[str],
    *,
    count: int | None = None,
    timeout_s: float | None = None,
    raw: bool = False,
    console: Console | None = None,
    limits: Limits | None = None,
    mode: Mode = "pretty",
    as_json: bool = False,
    interval_s: float = 1.0,
) -> int:
    """Show messages until ``count`` arrived or ``timeout_s`` passed; return how many came.

    ``mode``: ``pretty``, ``json`` (one line each) or ``rate`` (messages/s per filter every
    ``interval_s``; ``as_json`` writes those lines as JSON).
    :class:`~edgewise.cli.connect.BrokerTrouble` if the broker cannot be reached or refuses a
    subscription."""
    console = console or Console()
    limits = limits or Limits()
    seen = 0
    done = asyncio.Event()
    rates = RateCounter(filters)  # counts from now: retained messages come with the SUBACK
    show: Callable[[Inbound], None]
    if mode == "json":

        def show(msg: Inbound) -> None:
            # soft_wrap: one physical line whatever the width; out(): no markup, no highlighting.
            console.out(json_line(msg, limits=limits, raw=raw), highlight=False)

    elif mode == "rate":
        show = rates.add
    else:

        def show(msg: Inbound) -> None:
            render(msg, console, limits=limits, raw=raw)

    def on_message(msg: Inbound) -> None:
        nonlocal seen
        if done.is_set():
            return
        seen += 1
        show(msg)
        if count is not None and seen >= count:
            done.set()

    async def report_rates() -> None:
        while True:
            await asyncio.sleep(interval_s)
            _print_rates(rates.report(time.monotonic()), console, as_json=as_json)

    async with session(broker, purpose="watch", on_message=on_message, filters=filters):
        err.print(
            f"watching {', '.join(filters)} on {broker.who} (Ctrl-C stops)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        reporter = asyncio.create_task(report_rates()) if mode == "rate" else None
        try:
            async with asyncio.timeout(timeout_s):
                await done.wait()
        except TimeoutError:
            pass
        finally:
            if reporter is not None:
                reporter.cancel()
                _print_rates(rates.report(time.monotonic()), console, as_json=as_json)
    return seen
