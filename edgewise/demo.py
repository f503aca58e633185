"""``edgewise demo``: a broker, an edge node and a simulated sensor on this machine.

The sensor publishes the held-out digits frames; the node classifies them with the bundled ONNX
model; a live view shows throughput, end-to-end latency (sensor publish to result received) and
accuracy so far; a summary table closes the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from edge_node.config import NodeConfig
from edge_node.node import EdgeNode
from edgewise.frames import load_holdout
from edgewise.sensor import simulate
from local_broker import (
    BrokerInfo,
    EmbeddedBroker,
    MosquittoProcess,
    mosquitto_path,
    parse_broker_url,
)
from mqtt_session import Inbound, MqttConfig, MqttSession
from schemas import ContractError, Topics, decode_results, decode_status

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DemoReport:
    broker: str = ""
    sent: int = 0
    answered: set[int] = field(default_factory=set)
    correct: int = 0
    duplicates: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    rejected: int = 0
    batches: int = 0
    elapsed_s: float = 0.0
    model: str = ""

    @property
    def results(self) -> int:
        return len(self.answered)

    @property
    def accuracy(self) -> float:
        return self.correct / self.results if self.results else 0.0

    def quantile_ms(self, q: float) -> float:
        return float(np.quantile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def _table(report: DemoReport, *, title: str, elapsed_s: float) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    rate = report.results / elapsed_s if elapsed_s > 0 else 0.0
    t.add_row("broker", report.broker)
    t.add_row("model", report.model)
    t.add_row("frames sent", f"{report.sent:,}")
    t.add_row("results received", f"{report.results:,}")
    t.add_row("results/s", f"{rate:,.0f}")
    t.add_row(
        "latency p50 / p99", f"{report.quantile_ms(0.5):.2f} / {report.quantile_ms(0.99):.2f} ms"
    )
    t.add_row("accuracy so far", f"{report.accuracy:.1%}")
    t.add_row("rejected frames", f"{report.rejected:,}")
    return t


async def _start_broker(
    stack: contextlib.AsyncExitStack, url: str | None, console: Console
) -> BrokerInfo:
    if url:
        host, port = parse_broker_url(url)
        return BrokerInfo(host=host, port=port, kind="external")
    if mosquitto_path() is not None:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgewise-demo-")))
        proc = MosquittoProcess(workdir)
        info = await asyncio.to_thread(proc.start)
        stack.callback(proc.stop)
        console.print(f"[green]started Mosquitto[/] on {info.url} (config: the project's tuning)")
        return info
    info = await stack.enter_async_context(EmbeddedBroker())
    console.print(
        "[yellow]no mosquitto on PATH: using the embedded amqtt broker (MQTT 3.1.1)[/]"
        f" on {info.url}"
        "\n  install Mosquitto (apt-get install mosquitto) for the real thing"
    )
    return info


async def run_demo(
    *,
    duration_s: float = 15.0,
    rate_hz: float = 200.0,
    broker_url: str | None = None,
    console: Console | None = None,
    live: bool = True,
    node_id: str = "demo-gw",
) -> DemoReport:
    console = console or Console()
    report = DemoReport()
    frames = load_holdout()
    labels: dict[int, int] = {}
    topics = Topics()
    online = asyncio.Event()

    def on_message(msg: Inbound) -> None:
        if msg.topic == topics.status(node_id):
            with contextlib.suppress(ContractError):
                if decode_status(msg.payload).state == "online":
                    online.set()
            return
        try:
            batch = decode_results(msg.payload)
        except ContractError:
            return
        now = time.time()
        for r in batch.results:
            if r.frame_seq in report.answered:
                report.duplicates += 1
                continue
            report.answered.add(r.frame_seq)
            if labels.get(r.frame_seq) == r.label:
                report.correct += 1
            if r.frame_ts is not None:
                report.latencies_ms.append((now - r.frame_ts) * 1000.0)

    async with contextlib.AsyncExitStack() as stack:
        info = await _start_broker(stack, broker_url, console)
        report.broker = f"{info.kind} {info.url}"
        # amqtt speaks MQTT 3.1.1 only: say so up front instead of waiting for the fallback.
        protocol = "3.1.1" if info.kind == "embedded" else "auto"
        mqtt = MqttConfig(host=info.host, port=info.port, protocol=protocol)
        viewer = await stack.enter_async_context(
            MqttSession(
                mqtt,
                client_id=f"edgewise-demo-viewer-{node_id}",
                on_message=on_message,
                manual_ack=False,
                persistent=False,
            )
        )
        viewer.subscribe(topics.results(node_id))
        viewer.subscribe(topics.status(node_id))
        await viewer.wait_connected(mqtt.connect_timeout_s)
        # The demo's outbox is thrown away with the run; a real node keeps its state_dir.
        state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="edgewise-demo-"))
        node = await stack.enter_async_context(
            EdgeNode(NodeConfig.load(node_id=node_id, mqtt=mqtt, storage={"state_dir": state_dir}))
        )
        report.model = f"{node.model.name} r{node.model.release} ({node.model.runtime.provider})"
        async with asyncio.timeout(15):
            await online.wait()

        def on_sent(seq: int, label: int) -> None:
            labels[seq] = label
            report.sent += 1

        start = time.monotonic()
        sensor = asyncio.create_task(
            simulate(
                mqtt,
                device="cam-1",
                rate_hz=rate_hz,
                duration_s=duration_s,
                frames=frames,
                on_sent=on_sent,
            )
        )

        def view() -> Group:
            return Group(
                _table(report, title="edgewise demo (live)", elapsed_s=time.monotonic() - start)
            )

        with Live(
            view(), console=console, refresh_per_second=4, transient=True, auto_refresh=live
        ) as lv:
            while not sensor.done():
                await asyncio.wait([sensor], timeout=0.25)
                lv.update(view())
            await sensor
            deadline = time.monotonic() + 10.0
            while report.results < report.sent and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                lv.update(view())
        report.elapsed_s = time.monotonic() - start
        await node.drain()
        report.rejected = node.stats.rejected
        report.batches = node._batcher.batches
    console.print(_table(report, title="edgewise demo: summary", elapsed_s=report.elapsed_s))
    return report
