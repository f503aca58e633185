"""Retained messages for the operator's commands (``keys``, ``model``, ``cmd``, ``fleet``):
publish a set and wait for every PUBACK (with a progress bar), collect what is retained under
some filters, or write a set out for plain MQTT tools instead. How they reach the broker is
:mod:`edgewise.cli.connect`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from edgewise.cli.connect import Broker, err, publish, run, session
from edgewise.files import write_atomic


def write_file(path: Path, data: bytes) -> None:
    """Replace ``path`` durably (the key ring's version counter guards against key-set
    rollback: a power cut must not bring back an older one, nor leave half a file)."""
    write_atomic(path, data)


async def _publish(broker: Broker, items: list[tuple[str, bytes]], label: str) -> None:
    async with session(broker, purpose="cli") as s:
        # The bar starts once connected: a broker out of reach is one line, not a bar and a line.
        total = sum(len(p) for _, p in items)
        with Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), console=err, transient=False, disable=not label,
        ) as progress:  # fmt: skip
            task = progress.add_task(label or "publishing", total=max(total, 1))
            window = asyncio.Semaphore(64)

            async def one(topic: str, payload: bytes) -> None:
                async with window:
                    await publish(s, broker, topic, payload, retain=True)
                progress.advance(task, len(payload))

            outcomes = await asyncio.gather(*(one(t, p) for t, p in items), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome  # the first that failed (BrokerTrouble: the topic and why)


def publish_retained(broker: Broker, items: list[tuple[str, bytes]], *, label: str = "") -> None:
    """Publish retained at QoS 1 and wait for every PUBACK, with a progress bar over bytes
    (when ``label`` is given)."""
    run(_publish(broker, items, label))


async def _collect(broker: Broker, filters: Iterable[str], settle_s: float) -> dict[str, bytes]:
    from edgewise.mqtt import Inbound

    got: dict[str, bytes] = {}

    def keep(msg: Inbound) -> None:
        if msg.retain:
            got[msg.topic] = msg.payload

    async with session(broker, purpose="cli", on_message=keep, filters=filters):
        await asyncio.sleep(settle_s)
    return {t: p for t, p in got.items() if p}


def collect_retained(broker: Broker, filters: Iterable[str], settle_s: float) -> dict[str, bytes]:
    """The retained messages under ``filters`` (waiting ``settle_s`` for them to arrive); says
    on stderr which broker it read (one line)."""
    filters = list(filters)
    got = run(_collect(broker, filters, settle_s))
    err.print(
        f"read {len(got)} retained message{'' if len(got) == 1 else 's'} under"
        f" {', '.join(filters)} from {broker.who}",
        soft_wrap=True,
        markup=False,
        highlight=False,
    )
    return got


def write_out(out_dir: Path, items: list[tuple[str, bytes]], names: list[str]) -> Path:
    """Write each payload to ``out_dir/NAME`` and a ``publish.sh`` of mosquitto_pub lines."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["#!/bin/sh", "# Publish these retained payloads with plain MQTT tools.", "set -e",
             'HOST="${MQTT_HOST:-127.0.0.1}"', 'PORT="${MQTT_PORT:-1883}"']  # fmt: skip
    for (topic, payload), name in zip(items, names, strict=True):
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, payload)
        lines.append(f'mosquitto_pub -h "$HOST" -p "$PORT" -q 1 -r -t "{topic}" -f "{name}"')
    script = out_dir / "publish.sh"
    write_file(script, ("\n".join(lines) + "\n").encode())
    script.chmod(0o755)
    write_file(
        out_dir / "topics.tsv",
        "".join(f"{t}\t{n}\n" for (t, _), n in zip(items, names, strict=True)).encode(),
    )
    return script
