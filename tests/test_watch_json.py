"""`edgewise watch --json` (one JSON object per line, binary as base64, nothing truncated) and
`watch --rate` (messages/s per topic filter)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from typing import Any

import msgspec
import numpy as np

from edgewise.local_broker import BrokerInfo
from schemas import Frame, Result, ResultBatch, decode_frame, encode_frame, encode_results
from tests.conftest import ProbeFactory


def edgewise(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgewise.cli.app", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "80", "PATH": "/usr/bin:/bin"},  # a narrow "terminal": nothing wraps
    )


def _lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]  # every line is one object


def _batch(node: str, n: int) -> ResultBatch:
    results = [
        Result(
            id=f"r{i:04d}-{'x' * 40}",  # long strings: a pretty printer would cut them
            seq=i,
            device="cam-1",
            sensor="digits",
            frame_seq=1000 + i,
            frame_ts=1796657189.25 + i,
            model="digits",
            release=3,
            label=i % 10,
            confidence=0.5 + i / 100,
            source="edge",
            latency_ms=1.25,
        )
        for i in range(n)
    ]
    return ResultBatch(node=node, results=results)


def test_watch_json_round_trips_a_result_batch_and_binary(
    mosquitto: BrokerInfo, mqtt_probe: ProbeFactory
) -> None:
    node = f"wj-{time.monotonic_ns()}"
    batch = _batch(node, 40)  # more items than the pretty view shows (16)
    frame = Frame(seq=7, ts=1.5, tensor=np.arange(64, dtype=np.float32).reshape(8, 8))
    junk = b"\x00\xc1not msgpack\n\x1b[31m"
    probe = mqtt_probe()
    probe.publish(f"edge/{node}/results", encode_results(batch), qos=1, retain=True)
    probe.publish(f"edge/{node}/frame", encode_frame(frame), qos=1, retain=True)
    probe.publish(f"edge/{node}/junk", junk, qos=1, retain=True)
    try:
        out = edgewise(
            "watch", f"edge/{node}/#", "--broker", mosquitto.url, "--json", "-n", "3", "-t", "20"
        )
    finally:
        for t in ("results", "frame", "junk"):
            probe.publish(f"edge/{node}/{t}", b"", qos=1, retain=True)
    assert out.returncode == 0, out.stderr
    docs = {d["topic"].rsplit("/", 1)[1]: d for d in _lines(out.stdout)}
    assert set(docs) == {"results", "frame", "junk"}

    results = docs["results"]
    assert results["retain"] is True and results["qos"] == 1
    assert results["size_bytes"] == len(encode_results(batch))
    assert msgspec.convert(results["payload"], ResultBatch) == batch  # all 40, nothing cut

    wire = dict(docs["frame"]["payload"])
    wire["data"] = base64.b64decode(wire["data"])  # binary comes as base64
    assert decode_frame(msgspec.msgpack.encode(wire)) == frame

    assert base64.b64decode(docs["junk"]["payload_base64"]) == junk
    assert docs["junk"]["error"].startswith("malformed")
    assert docs["junk"]["ts"].endswith("Z")


def test_watch_rate_counts_messages_per_filter(
    mosquitto: BrokerInfo, mqtt_probe: ProbeFactory
) -> None:
    node = f"wr-{time.monotonic_ns()}"
    probe = mqtt_probe()
    for i in range(5):
        probe.publish(f"edge/{node}/m{i}", b"{}", qos=1, retain=True)
    try:
        out = edgewise(
            "watch", f"edge/{node}/#", "other/none/#", "--broker", mosquitto.url,
            "--rate", "--json", "-n", "5", "-t", "20",
        )  # fmt: skip
    finally:
        for i in range(5):
            probe.publish(f"edge/{node}/m{i}", b"", qos=1, retain=True)
    assert out.returncode == 0, out.stderr
    reports = _lines(out.stdout)
    assert reports, out.stdout
    for report in reports:
        assert [r["filter"] for r in report["rates"]] == [f"edge/{node}/#", "other/none/#"]
    assert sum(r["rates"][0]["messages_per_s"] for r in reports) > 0
    assert all(r["rates"][1]["messages_per_s"] == 0 for r in reports)
    assert "edge/" not in out.stdout.replace(f'"edge/{node}/#"', "")  # no message shown
