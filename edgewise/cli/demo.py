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

This module starts the stack (broker, cloud worker, node, sensor, the update) and runs it;
:mod:`edgewise.cli.demo_view` holds what the viewer sees and the table it shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.live import Live

from cloud_worker import Worker
from edge_node.node import EdgeNode
from edgewise.assets import bundled_asset
from edgewise.cli.connect import Broker, broker_settings, connected
from edgewise.cli.defaults import node_config, worker_config
from edgewise.cli.demo_update import DemoFleet
from edgewise.cli.demo_view import DemoReport, DemoWatch, table
from edgewise.cli.frames import load_holdout
from edgewise.cli.sensor import simulate
from edgewise.local_broker import BrokerInfo, EmbeddedBroker, MosquittoProcess, mosquitto_path
from edgewise.mqtt import MqttConfig, MqttSession
from edgewise.serving.model import ServedModel
from schemas import (
    Topics,
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
    topics = Topics()
    watch = DemoWatch(
        report, topics=topics, node_id=node_id, edge_labels=_edge_labels(frames.images)
    )
    fleet = DemoFleet()
    start = watch.start

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
                on_message=watch.on_message,
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
                worker_config(
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
                node_config(
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
            await watch.online.wait()

        start = watch.start = time.monotonic()
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
                on_sent=watch.on_sent,
                stop=stop,
            )
        )

        def view() -> Group:
            return Group(
                table(
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
    console.print(table(report, title=title, elapsed_s=report.elapsed_s, start=start))
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
