"""`edgewise fleet exporter` scraped by a real Prometheus (Debian's package, installed by
`./dev.sh test`), with a real node and a real worker on a real Mosquitto: PromQL reads back the
node's results counter and the fleet p99, and they agree with the node's own telemetry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from cloud_worker import Worker
from edgewise.cli.exporter.service import Exporter
from edgewise.cli.frames import load_holdout
from edgewise.local_broker import BrokerInfo, free_port
from edgewise.telemetry import LatencySketch, merged
from schemas import decode_telemetry
from tests.nodeharness import frame_bytes, mqtt_for, running_node
from tests.test_observability_stack import expressions, runnable
from tests.test_worker_harness import worker_config

HOLDOUT = load_holdout()


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or shutil.which("prometheus", path="/usr/bin:/usr/sbin")
    assert found, "Prometheus is not installed: ./dev.sh test installs it (Debian's package)"
    return found


@contextlib.contextmanager
def prometheus(tmp_path: Path, target_port: int) -> Iterator[str]:
    """A Prometheus scraping 127.0.0.1:target_port every second; yields its API base URL."""
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: edgewise\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target_port}']\n",
        encoding="utf-8",
    )
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            prometheus_binary(),
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def query(api: str, promql: str) -> list[dict[str, object]]:
    url = f"{api}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # Prometheus refused the query: say why
        body = json.loads(exc.read())
    except OSError:
        return []  # not up yet
    assert body["status"] == "success", (promql, body)
    return body["data"]["result"]  # type: ignore[no-any-return]


async def value_of(api: str, promql: str, want: float, timeout_s: float = 60) -> float:
    """Poll ``promql`` until it returns ``want`` (one series); the last value otherwise."""
    last: float | None = None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while True:
                result = await asyncio.to_thread(query, api, promql)
                if len(result) == 1:
                    last = float(result[0]["value"][1])  # type: ignore[index]
                    if last == want:
                        return last
                await asyncio.sleep(0.5)
    raise AssertionError(f"{promql}: {last}, want {want}")


def test_prometheus_reads_back_a_live_nodes_results_and_the_fleet_p99(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    total = 200

    async def scenario() -> None:
        async with (
            running_node(mosquitto, telemetry={"window_s": 1.0}) as h,
            Worker(worker_config(mosquitto, tmp_path)) as worker,
            Exporter(mqtt_for(mosquitto), host="127.0.0.1", port=0) as exp,
        ):
            exp.fleet.max_age_s = 3600.0  # every window of the run counts for the quantiles
            with prometheus(tmp_path, exp.port) as api:
                for i in range(total):
                    await h.send(frame_bytes(i, HOLDOUT.images[i % len(HOLDOUT.images)]))

                def windows() -> list[bytes]:
                    return [m.payload for m in h.messages("telemetry")]

                def results_counted() -> int:
                    return sum(decode_telemetry(p).counts.get("results", 0) for p in windows())

                await h.seen.wait_for(lambda: results_counted() >= total, 30)
                # What the node itself said: its windows, merged.
                sketch = merged(
                    [LatencySketch.from_bytes(decode_telemetry(p).latency) for p in windows()]
                )
                assert sketch.count == total
                p99 = sketch.quantile(0.99)
                assert p99 is not None

                node = h.node_id
                got = await value_of(api, f'edgewise_node_results_total{{node="{node}"}}', total)
                assert got == total
                fleet_p99 = await value_of(
                    api, 'edgewise_fleet_latency_seconds{quantile="0.99"}', p99 / 1000
                )
                assert fleet_p99 == p99 / 1000
                up = await value_of(api, f'edgewise_worker_up{{worker="{worker.worker_id}"}}', 1)
                assert up == 1
                assert await value_of(api, f'edgewise_node_up{{node="{node}"}}', 1) == 1
                assert await value_of(api, "edgewise_exporter_connected", 1) == 1
                # Every query of the shipped dashboard is PromQL this Prometheus runs.
                for expr in expressions():
                    await asyncio.to_thread(query, api, runnable(expr))

    asyncio.run(scenario())
