"""What the node says about its own health: session recycling, latency SLO, telemetry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgewise.cli.frames import load_holdout
from edgewise.local_broker import BrokerInfo, TcpProxy
from edgewise.telemetry import LatencySketch, merged
from schemas import Telemetry, decode_results, decode_status, decode_telemetry
from tests.nodeharness import Harness, frame_bytes, running_node
from tests.waiting import eventually

HOLDOUT = load_holdout()


def _answered(h: Harness) -> set[int]:
    return {r.frame_seq for m in h.messages("results") for r in decode_results(m.payload).results}


def test_the_inference_session_is_recycled_while_frames_keep_being_served(
    mosquitto: BrokerInfo,
) -> None:
    async def scenario() -> None:
        # Once a second (1/3600 h), while 20 frames go in every 50 ms.
        async with running_node(mosquitto, model={"recycle_session_h": 1 / 3600}) as h:
            sent = 0
            first_model = h.node.model
            while h.node.stats.session_recycles < 2:
                for _ in range(20):
                    await h.send(frame_bytes(sent, HOLDOUT.images[sent % len(HOLDOUT.images)]))
                    sent += 1
                await asyncio.sleep(0.05)
                assert sent < 20 * 200, "no recycle in 10 s of traffic"
            await h.seen.wait_for(lambda: len(_answered(h)) >= sent, 20)
            assert _answered(h) == set(range(sent))
            assert h.node.stats.inference_errors == 0
            assert h.node.stats.rejected == 0
            assert h.node.model is not first_model  # a fresh session serves now

    asyncio.run(scenario())


def _windows(h: Harness) -> list[Telemetry]:
    return [decode_telemetry(m.payload) for m in h.messages("telemetry")]


def _frames_counted(h: Harness) -> int:
    return sum(t.counts.get("frames", 0) for t in _windows(h))


def test_telemetry_windows_carry_counts_and_a_sketch_that_matches_the_results(
    mosquitto: BrokerInfo,
) -> None:
    async def scenario() -> None:
        async with running_node(
            mosquitto, telemetry={"window_s": 0.3}, hardware_class="x86-cpu-gateway"
        ) as h:
            total = 300
            for i in range(total):
                await h.send(frame_bytes(i, HOLDOUT.images[i % len(HOLDOUT.images)]))
            await h.send(b"not a frame")
            await h.seen.wait_for(lambda: len(_answered(h)) >= total, 20)
            await h.seen.wait_for(lambda: _frames_counted(h) >= total + 1, 20)
            windows = _windows(h)
            status = decode_status(h.messages("status")[-1].payload)
            assert [t.seq for t in windows] == list(range(len(windows)))
            assert {t.boot_id for t in windows} == {status.boot_id}
            assert {(t.model, t.hardware_class, t.runtime) for t in windows} == {
                ("digits", "x86-cpu-gateway", "onnxruntime")
            }
            assert sum(t.counts.get("results", 0) for t in windows) == total
            assert sum(t.rejects.get("malformed", 0) for t in windows) == 1
            assert all(t.rss_bytes > 0 and t.uptime_s > 0 for t in windows)
            # The merged sketches hold exactly the results' latencies, to within 1 %.
            merged_sketch = merged([LatencySketch.from_bytes(t.latency) for t in windows])
            latencies = np.array(
                [
                    r.latency_ms
                    for m in h.messages("results")
                    for r in decode_results(m.payload).results
                ]
            )
            assert merged_sketch.count == total == len(latencies)
            for q in (0.5, 0.99):
                got = merged_sketch.quantile(q)
                assert got is not None
                lo = np.quantile(latencies, q, method="lower") * 0.99
                hi = np.quantile(latencies, q, method="higher") * 1.01
                assert lo <= got <= hi, (q, got, lo, hi)

    asyncio.run(scenario())


def test_latency_over_the_slo_degrades_the_status_and_clears_when_it_goes(
    mosquitto: BrokerInfo,
) -> None:
    def last_status(h: Harness) -> tuple[str, list[str]]:
        s = decode_status(h.messages("status")[-1].payload)
        return s.state, list(s.reasons)

    async def scenario() -> None:
        # An SLO no real latency meets (1 ns): every window with a frame breaks it.
        async with running_node(
            mosquitto, telemetry={"window_s": 0.3}, health={"latency_slo_p99_ms": 1e-6}
        ) as h:
            assert last_status(h) == ("online", [])
            await h.send(frame_bytes(0, HOLDOUT.images[0]))
            await h.seen.wait_for(lambda: last_status(h) == ("degraded", ["latency_slo"]), 10)
            await h.seen.wait_for(lambda: any(t.counts.get("frames") for t in _windows(h)), 10)
            window_with_frame = max(t.seq for t in _windows(h) if t.counts.get("frames"))
            # No frames, no latency over the SLO: the next empty window clears it.
            await h.seen.wait_for(lambda: last_status(h) == ("online", []), 10)
            await h.seen.wait_for(
                lambda: any(t.seq > window_with_frame and not t.latency_count for t in _windows(h))
            )

    asyncio.run(scenario())


def _model_serving_one_frame_per_call(tmp_path: Path) -> Path:
    """A digits model (image (N, 8, 8) -> probabilities (N, 10)) whose graph reshapes its input
    to (1, 64): ONNX Runtime serves a batch of one and fails on any larger batch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(3).normal(size=(64, 10)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["image", "one_row"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weights"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "one_per_call",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 8, 8])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        initializer=[
            numpy_helper.from_array(np.array([1, 64], dtype=np.int64), "one_row"),
            numpy_helper.from_array(weights, "weights"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / "one_per_call.onnx"
    onnx.save(model, path)
    return path


def test_a_model_that_fails_degrades_the_status_until_it_serves_again(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    def last_status(h: Harness) -> tuple[str, list[str]]:
        s = decode_status(h.messages("status")[-1].payload)
        return s.state, list(s.reasons)

    async def scenario() -> None:
        async with running_node(
            mosquitto,
            model={"path": str(_model_serving_one_frame_per_call(tmp_path))},
            batching={"max_batch_size": 8, "max_wait_ms": 300},
        ) as h:
            assert last_status(h) == ("online", [])
            for i in range(4):  # one batch: the model cannot serve it
                await h.send(frame_bytes(i, HOLDOUT.images[i]))
            await h.seen.wait_for(lambda: last_status(h) == ("degraded", ["model_unavailable"]))
            assert h.node.stats.inference_errors >= 1
            await h.seen.wait_for(lambda: bool(h.messages("deadletter")))  # inference_failed
            await h.send(frame_bytes(4, HOLDOUT.images[4]))  # alone: served
            await h.seen.wait_for(lambda: 4 in _answered(h))
            await h.seen.wait_for(lambda: last_status(h) == ("online", []))

    asyncio.run(scenario())


def test_telemetry_made_while_the_uplink_is_cut_is_stored_and_arrives_later(
    mosquitto: BrokerInfo,
) -> None:
    async def scenario() -> None:
        with TcpProxy(mosquitto.host, mosquitto.port) as proxy:
            uplink = {
                "host": proxy.host,
                "port": proxy.port,
                "connect_timeout_s": 2,
                "reconnect_first_s": 0.1,
                "reconnect_cap_s": 0.5,
            }
            async with running_node(
                mosquitto,
                uplink=uplink,
                telemetry={"window_s": 0.3},
                health={"uplink_grace_s": 0.3},
            ) as h:
                await h.seen.wait_for(lambda: len(_windows(h)) >= 1, 10)
                proxy.cut()
                await eventually(
                    lambda: "uplink_down" in h.node.reasons,
                    '"uplink_down" in h.node.reasons',
                    timeout_s=10,
                )
                said_at = h.node.stats.telemetry_windows
                await eventually(
                    lambda: h.node.stats.telemetry_windows >= said_at + 2,
                    "h.node.stats.telemetry_windows >= said_at + 2",
                    timeout_s=10,
                )
                seen_during_cut = {t.seq for t in _windows(h)}
                proxy.restore()
                made = h.node.stats.telemetry_windows
                await h.seen.wait_for(lambda: {t.seq for t in _windows(h)} >= set(range(made)), 20)
                late = [t for t in _windows(h) if t.seq not in seen_during_cut]
                assert any("uplink_down" in t.reasons for t in late), "no window said uplink_down"
                assert {t.seq for t in _windows(h)} >= set(range(made))

    asyncio.run(scenario())


def test_a_full_disk_is_reported_by_the_next_telemetry_window_without_any_frame(
    mosquitto: BrokerInfo, small_filesystem: Callable[[str], Path]
) -> None:
    state = small_filesystem("1m")

    async def scenario() -> None:
        async with running_node(
            mosquitto, storage={"state_dir": str(state)}, telemetry={"window_s": 1.0}
        ) as h:
            filler = state / "filler"
            with contextlib.suppress(OSError), filler.open("wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
            reasons = lambda: decode_status(h.messages("status")[-1].payload).reasons  # noqa: E731
            # One window (1 s) plus a margin: no frame is sent, the window's write finds it.
            await h.seen.wait_for(lambda: reasons() == ["storage_full"], 10)
            # Published directly while it cannot be stored.
            await h.seen.wait_for(lambda: bool(_windows(h)), 10)
            filler.unlink()
            await h.seen.wait_for(lambda: reasons() == [], 10)

    asyncio.run(scenario())


def test_fleet_status_lists_two_real_nodes_and_merges_their_sketches(
    mosquitto: BrokerInfo,
) -> None:
    async def scenario() -> None:
        async with (
            running_node(mosquitto, telemetry={"window_s": 0.3}) as a,
            running_node(mosquitto, telemetry={"window_s": 0.3}) as b,
        ):
            stop = asyncio.Event()

            async def traffic() -> None:
                i = 0
                while not stop.is_set():
                    for h in (a, b):
                        await h.send(frame_bytes(i, HOLDOUT.images[i % len(HOLDOUT.images)]))
                    i += 1
                    await asyncio.sleep(0.005)

            sender = asyncio.create_task(traffic())
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "edgewise.cli.app",
                "fleet",
                "status",
                "--broker",
                mosquitto.url,
                "--duration",
                "2",
                "--json",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await proc.communicate()
            stop.set()
            await sender
            assert proc.returncode == 0, err.decode()
            report = json.loads(out)
            rows = {r["node"]: r for r in report["nodes"]}
            for h in (a, b):
                row = rows[h.node_id]
                assert (row["state"], row["model"], row["boot_id"]) == (
                    "online",
                    "digits",
                    h.node.boot_id,
                )
                assert row["frames_per_s"] > 0
                assert row["p99_ms"] is not None and row["p99_ms"] >= row["p50_ms"] > 0
            assert report["fleet"]["p99_ms"] >= min(rows[h.node_id]["p99_ms"] for h in (a, b))

    asyncio.run(scenario())
