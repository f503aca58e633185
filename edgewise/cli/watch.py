"""``edgewise watch``: subscribe to topic filters and pretty-print decoded messages."""

from __future__ import annotations

import asyncio
from datetime import datetime

from rich.console import Console
from rich.pretty import Pretty

from edgewise.cli.connect import Broker, session
from edgewise.mqtt import Inbound
from schemas import ContractError, Limits, decode_any


def render(msg: Inbound, console: Console, *, limits: Limits, raw: bool = False) -> None:
    stamp = datetime.now().strftime("%H:%M:%S.%f")[:-3]
    flags = " [yellow]retained[/]" if msg.retain else ""
    console.print(
        f"[dim]{stamp}[/] [bold cyan]{msg.topic}[/] qos={msg.qos}{flags} {len(msg.payload)} B"
    )
    if raw:
        console.print(repr(msg.payload[:512]))
        return
    if not msg.payload:
        console.print("  [dim](empty payload)[/]")
        return
    try:
        console.print(Pretty(decode_any(msg.payload, limits), max_length=16, max_string=120))
    except ContractError as exc:
        console.print(f"  [red]not decodable ({exc.reason}: {exc.detail})[/] {msg.payload[:64]!r}")


async def watch(
    broker: Broker,
    filters: list[str],
    *,
    count: int | None = None,
    timeout_s: float | None = None,
    raw: bool = False,
    console: Console | None = None,
    limits: Limits | None = None,
) -> int:
    """Print messages until ``count`` were shown or ``timeout_s`` passed; return how many.

    :class:`~edgewise.cli.connect.BrokerTrouble` if the broker cannot be reached or refuses a
    subscription."""
    console = console or Console()
    limits = limits or Limits()
    seen = 0
    done = asyncio.Event()

    def on_message(msg: Inbound) -> None:
        nonlocal seen
        if done.is_set():
            return
        seen += 1
        render(msg, console, limits=limits, raw=raw)
        if count is not None and seen >= count:
            done.set()

    async with session(broker, purpose="watch", on_message=on_message, filters=filters):
        try:
            async with asyncio.timeout(timeout_s):
                await done.wait()
        except TimeoutError:
            pass
    return seen
