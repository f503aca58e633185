"""``edgewise demo``: a broker, an edge node, a cloud worker and a simulated sensor here.

The sensor publishes the held-out digits frames; the node classifies them with the small bundled
edge model and escalates the ones it is unsure of to the cloud worker, which answers with the
bigger cloud model; a live view shows throughput, end-to-end latency (sensor publish to result
received), accuracy so far and the escalations; a summary table closes the run with edge-only
accuracy (the edge model alone on the same frames), hybrid accuracy (the results received),
escalation rate and escalation round trip (escalation seen on the broker to reply seen).

Part way through, a signed model update rolls out (:mod:`edgewise.cli.demo_update`): the node is
enrolled with a root key made for the run, a release of the edge model is published retained,
and the node verifies, downloads, validates, swaps it in while frames keep flowing, and commits
it after probation; the summary shows the update's steps, the results served by each release and
the largest gap between results while it happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from cloud_worker import Worker, WorkerConfig
from edge_node.config import NodeConfig, bundled_asset
from edge_node.node import EdgeNode
from edgewise.cli.connect import Broker, broker_settings, connected
from edgewise.cli.demo_update import DemoFleet
from edgewise.cli.frames import load_holdout
from edgewise.cli.sensor import simulate
from edgewise.local_broker import BrokerInfo, EmbeddedBroker, MosquittoProcess, mosquitto_path
from edgewise.mqtt import Inbound, MqttConfig, MqttSession
from edgewise.releases import ReleaseError, decode_event
from edgewise.serving.model import ServedModel
from schemas import (
    ContractError,
    Topics,
    decode_escalations,
    decode_replies,
    decode_results,
    decode_status,
)

log = logging.getLogger(__name__)


def _edge_labels(images: np.ndarray) -> np.ndarray:
    """What the edge model alone says for each held-out image (the edge-only baseline)."""
    model = ServedModel.load(
        str(bundled_asset("digits_edge.onnx")),
        name="digits",
        release=0,
        output="probabilities",
        providers=("CPUExecutionProvider",),
        intra_op_threads=1,
    )
    try:
        labels: np.ndarray = model.predict(images).labels
        return labels
    finally:
        model.close()


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
    cloud: bool = True
    edge_correct: int = 0
    sources: Counter[str] = field(default_factory=Counter)
    escalated_at: dict[str, float] = field(default_factory=dict)
    round_trips_ms: list[float] = field(default_factory=list)
    update: bool = True
    update_release: int | None = None
    update_steps: list[tuple[float, str]] = field(default_factory=list)
    """(seconds since the sensor started, event kind[:reason]) of the node's update events."""
    by_release: Counter[int] = field(default_factory=Counter)
    result_times: list[float] = field(default_factory=list)
    """When each results message arrived (monotonic): the gaps while the model was swapped."""
    inference_errors: int = 0
    update_topics: list[str] = field(default_factory=list)
    """Where the update was published retained (cleared again at the end of the run)."""
    interrupted: bool = False
    """Stopped early (Ctrl-C, ``stop``): the summary is of the run so far."""

    @property
    def results(self) -> int:
        return len(self.answered)

    @property
    def accuracy(self) -> float:
        return self.correct / self.results if self.results else 0.0

    def quantile_ms(self, q: float) -> float:
        return float(np.quantile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def edge_accuracy(self) -> float:
        return self.edge_correct / self.results if self.results else 0.0

    @property
    def escalation_rate(self) -> float:
        return 1.0 - self.sources["edge"] / self.results if self.results else 0.0

    def round_trip_ms(self, q: float) -> float:
        rt = self.round_trips_ms
        return float(np.quantile(rt, q)) if rt else float("nan")

    @property
    def update_outcome(self) -> str:
        """The last step the update reached (``committed`` when it rolled out)."""
        return self.update_steps[-1][1] if self.update_steps else "not started"

    def update_gap_ms(self, start: float) -> float:
        """The largest gap between results messages from the first update event (``start`` is
        the monotonic time the sensor started) to one second after the last one."""
        if not self.update_steps:
            return float("nan")
        lo = start + self.update_steps[0][0]
        hi = start + self.update_steps[-1][0] + 1.0
        times = [t for t in self.result_times if lo <= t <= hi]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        return max(gaps) * 1000.0 if gaps else float("nan")


def _table(
    report: DemoReport, *, title: str, elapsed_s: float, start: float | None = None
) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    rate = report.results / elapsed_s if elapsed_s > 0 else 0.0
    t.add_row("broker", report.broker)
    t.add_row("model at start", report.model)
    t.add_row("frames sent", f"{report.sent:,}")
    t.add_row("results received", f"{report.results:,}")
    t.add_row("results/s", f"{rate:,.0f}")
    t.add_row(
        "latency p50 / p99", f"{report.quantile_ms(0.5):.2f} / {report.quantile_ms(0.99):.2f} ms"
    )
    t.add_row("accuracy so far", f"{report.accuracy:.1%}")
    if report.cloud:
        t.add_row("edge-only accuracy", f"{report.edge_accuracy:.1%}")
        t.add_row("hybrid accuracy", f"{report.accuracy:.1%}")
        t.add_row("escalation rate", f"{report.escalation_rate:.1%}")
        t.add_row(
            "escalation round trip p50 / p99",
            f"{report.round_trip_ms(0.5):.2f} / {report.round_trip_ms(0.99):.2f} ms",
        )
        t.add_row("sources", ", ".join(f"{k} {v:,}" for k, v in sorted(report.sources.items())))
    if report.update:
        steps = " → ".join(k for _, k in report.update_steps) or "waiting"
        t.add_row(f"model update to r{report.update_release}", steps)
        t.add_row(
            "results by release",
            ", ".join(f"r{k} {v:,}" for k, v in sorted(report.by_release.items())),
        )
        if start is not None and report.update_steps:
            took = report.update_steps[-1][0] - report.update_steps[0][0]
            t.add_row("update took", f"{took:.1f} s, {report.inference_errors} failed inferences")
            t.add_row("largest result gap during it", f"{report.update_gap_ms(start):.0f} ms")
    t.add_row("rejected frames", f"{report.rejected:,}")
    return t


async def _start_broker(stack: contextlib.AsyncExitStack, console: Console) -> BrokerInfo:
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
    broker: Broker | None = None,
    console: Console | None = None,
    live: bool = True,
    node_id: str = "demo-gw",
    cloud: bool = True,
    update: bool = True,
    update_at_s: float | None = None,
    stop: asyncio.Event | None = None,
) -> DemoReport:
    """Run the demo for ``duration_s``; with ``update``, publish a signed release of the edge
    model ``update_at_s`` after the sensor starts (default: a quarter of the run).

    ``broker`` (or ``broker_url``, without credentials): an existing broker instead of one
    started here; :class:`~edgewise.cli.connect.BrokerTrouble` if it cannot be reached.
    ``stop`` set (Ctrl-C): the sensor stops, the results of the frames sent are awaited and the
    summary is of the run so far (``interrupted``)."""
    stop = stop or asyncio.Event()
    console = console or Console()
    report = DemoReport(cloud=cloud, update=update)
    frames = load_holdout()
    labels: dict[int, int] = {}
    topics = Topics()
    online = asyncio.Event()
    edge_labels = _edge_labels(frames.images)
    fleet = DemoFleet()
    start = time.monotonic()

    def on_message(msg: Inbound) -> None:
        if msg.topic == topics.events(node_id):
            with contextlib.suppress(ReleaseError):
                e = decode_event(msg.payload)
                if not msg.retain and e.release == report.update_release:
                    kind = e.kind if e.reason is None else f"{e.kind}:{e.reason}"
                    report.update_steps.append((time.monotonic() - start, kind))
            return
        if msg.topic.startswith(f"{topics.cloud_root}/escalations/"):
            with contextlib.suppress(ContractError):
                for case in decode_escalations(msg.payload).cases:
                    report.escalated_at.setdefault(case.id, msg.received_at)
            return
        if msg.topic == topics.reply(node_id):
            with contextlib.suppress(ContractError):
                for verdict in decode_replies(msg.payload).verdicts:
                    sent_at = report.escalated_at.pop(verdict.id, None)
                    if sent_at is not None:
                        report.round_trips_ms.append((msg.received_at - sent_at) * 1000.0)
            return
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
        report.result_times.append(time.monotonic())
        for r in batch.results:
            if r.frame_seq in report.answered:
                report.duplicates += 1
                continue
            report.answered.add(r.frame_seq)
            report.sources[r.source] += 1
            report.by_release[r.release] += 1
            if labels.get(r.frame_seq) == r.label:
                report.correct += 1
            if labels.get(r.frame_seq) == edge_labels[r.frame_seq % len(edge_labels)]:
                report.edge_correct += 1
            if r.frame_ts is not None:
                report.latencies_ms.append((now - r.frame_ts) * 1000.0)

    if broker is None and broker_url:
        broker = broker_settings(broker_url, None, None, None)
    async with contextlib.AsyncExitStack() as stack:
        if broker is not None:
            report.broker = f"external {broker.url}"
        else:
            info = await _start_broker(stack, console)
            report.broker = f"{info.kind} {info.url}"
            # amqtt speaks MQTT 3.1.1 only: say so up front instead of waiting for the fallback.
            protocol = "3.1.1" if info.kind == "embedded" else "auto"
            broker = Broker(info.url, MqttConfig(host=info.host, port=info.port, protocol=protocol))
        mqtt = broker.mqtt
        viewer = await stack.enter_async_context(
            MqttSession(
                mqtt,
                client_id=f"edgewise-demo-viewer-{node_id}",
                on_message=on_message,
                manual_ack=False,
                persistent=False,
            )
        )
        await connected(viewer, broker)  # or one line saying why, before anything else starts
        viewer.subscribe(topics.results(node_id))
        viewer.subscribe(topics.status(node_id))
        if update:
            viewer.subscribe(topics.events(node_id))
        # The demo's outbox and hard examples are thrown away with the run.
        state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="edgewise-demo-"))
        if cloud:
            viewer.subscribe(topics.escalations_filter(None))
            viewer.subscribe(topics.reply(node_id))
            worker = Worker(
                WorkerConfig.load(
                    worker_id=f"{node_id}-worker",
                    group=f"{node_id}-workers",
                    mqtt=mqtt,
                    store={"path": str(Path(state_dir) / "hard_examples.db")},
                    log_level="WARNING",
                )
            )
            await stack.enter_async_context(worker)
            console.print(f"[green]started a cloud worker[/] on {worker.subscription}")
        await viewer.wait_connected(mqtt.connect_timeout_s)
        node = await stack.enter_async_context(
            EdgeNode(
                NodeConfig.load(
                    node_id=node_id,
                    mqtt=mqtt,
                    storage={"state_dir": state_dir},
                    escalation={"enabled": cloud},
                    **(_update_settings(fleet, Path(state_dir)) if update else {}),
                )
            )
        )
        report.model = f"{node.model.name} r{node.model.release} ({node.model.runtime.provider})"
        async with asyncio.timeout(15):
            await online.wait()

        def on_sent(seq: int, label: int) -> None:
            labels[seq] = label
            report.sent += 1

        start = time.monotonic()
        publisher: asyncio.Task[None] | None = None
        if update:
            report.update_release = node.model.release + 1
            publisher = asyncio.create_task(
                _publish_update(
                    viewer,
                    fleet,
                    topics,
                    node,
                    release=report.update_release,
                    delay_s=duration_s / 4 if update_at_s is None else update_at_s,
                )
            )
        sensor = asyncio.create_task(
            simulate(
                mqtt,
                device="cam-1",
                rate_hz=rate_hz,
                duration_s=duration_s,
                frames=frames,
                on_sent=on_sent,
                stop=stop,
            )
        )

        def view() -> Group:
            return Group(
                _table(
                    report,
                    title="edgewise demo (live)",
                    elapsed_s=time.monotonic() - start,
                    start=start,
                )
            )

        with Live(
            view(), console=console, refresh_per_second=4, transient=True, auto_refresh=live
        ) as lv:
            while not sensor.done():
                await asyncio.wait([sensor], timeout=0.25)
                lv.update(view())
            await sensor
            deadline = time.monotonic() + 10.0

            def waiting() -> bool:
                if report.results < report.sent:
                    return True
                ended = report.update_outcome.split(":")[0] in _UPDATE_ENDS
                return update and not stop.is_set() and not ended

            while waiting() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                lv.update(view())
        report.interrupted = stop.is_set()
        if publisher is not None:
            if stop.is_set():
                publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
            report.update_topics = list(fleet.retained)
            await fleet.clear(viewer)  # leave no retained release behind on the broker
        report.elapsed_s = time.monotonic() - start
        report.inference_errors = node.stats.inference_errors
        await node.drain()
        report.rejected = node.stats.rejected
        report.batches = node._batcher.batches
    title = "edgewise demo: summary" + (" (interrupted)" if report.interrupted else "")
    console.print(_table(report, title=title, elapsed_s=report.elapsed_s, start=start))
    return report


_UPDATE_ENDS = ("committed", "rolled_back", "rejected", "abandoned")


def _update_settings(fleet: DemoFleet, state_dir: Path) -> dict[str, Any]:
    """Node settings for the demo's update: enrolled with the run's root key, release topics of
    this run only (an external broker may hold another run's retained release), and a short
    probation (2 s and 20 inferences, at most 5 s, where a real node would watch for minutes)."""
    run = secrets.token_hex(4)
    return {
        "hardware_class": "generic-cpu",
        "topics": {"fleet_root": f"demo-fleet-{run}", "models_root": f"demo-models-{run}"},
        "updates": {
            "root_key": str(fleet.enrol(state_dir)),
            "probation_s": 2.0,
            "probation_min_inferences": 20,
            "probation_max_s": 5.0,
        },
    }


async def _publish_update(
    session: MqttSession,
    fleet: DemoFleet,
    topics: Topics,
    node: EdgeNode,
    *,
    release: int,
    delay_s: float,
) -> None:
    await asyncio.sleep(delay_s)
    await fleet.publish(
        session,
        node.topics,
        name=node.model.name,
        release=release,
        hw_class=node.config.hardware_class,
        holdout=load_holdout(),
    )
