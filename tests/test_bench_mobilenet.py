"""Checks of the MobileNet benchmark helpers' logic (no timings): the frames it sends fit the
node config it sets, and its profile summary adds up. A wrong helper would report wrong figures.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import pytest

from bench.mobilenet import FRAME_BYTES, FRAME_SHAPE, Stats, node_env, overhead_share, parse_args
from bench.stacks import IDLE, OTHER, parse_frame, summarize
from bench.workers import random_frames
from edge_node.config import NodeConfig
from edgewise.local_broker import BrokerInfo, MqttProbe
from schemas import ContractError, Frame, decode_frame, encode_frame

RAW = """\
<module> (edgewise/cli/app.py:10);main (edge_node/service.py:20);_answer (edge_node/node.py:650);\
_infer (edge_node/node.py:205);run (edgewise/serving/runtime/onnx.py:170);\
Session.run (onnxruntime/capi/onnxruntime_inference_collection.py:266) 40
<module> (edgewise/cli/app.py:10);_on_message (edge_node/node.py:600);\
decode_frame (schemas/frame.py:80) 7
<module> (edgewise/cli/app.py:10);_store (edge_node/node.py:840);\
append (edgewise/outbox/store.py:200);_send (paho/mqtt/client.py:900) 3
<module> (edgewise/cli/app.py:10);_on_message (edge_node/node.py:600) 5
_bootstrap (threading.py:1002);_worker (concurrent/futures/thread.py:81) 90
<module> (edgewise/cli/app.py:10);run_forever (asyncio/base_events.py:600);\
EpollSelector.select (selectors.py:468) 10
<module> (edgewise/cli/app.py:10);helper (somewhere/else.py:1) 2
not a stack line
"""


def test_samples_go_to_the_innermost_claimed_part_and_idle_leaves_are_set_apart() -> None:
    s = summarize(RAW.splitlines())
    assert s.samples == 157
    assert s.skipped_lines == 1
    assert s.by_part[IDLE] == 100
    assert s.busy == 57
    assert s.by_part["inference (onnxruntime)"] == 40
    assert s.by_part["frame decode and checks"] == 7
    # paho called by the outbox counts as MQTT: the innermost claimed frame wins
    assert s.by_part["MQTT (paho)"] == 3
    assert s.by_part["outbox (SQLite)"] == 0
    assert s.by_part["node"] == 5
    assert s.by_part[OTHER] == 2
    assert s.share("inference (onnxruntime)") == pytest.approx(40 / 57)
    assert s.share(IDLE) == 0.0
    leaf = "Session.run (onnxruntime/capi/onnxruntime_inference_collection.py)"
    assert s.by_leaf.most_common(1) == [(leaf, 40)]
    assert not any("_worker" in k for k in s.by_leaf)


def test_frame_text_is_split_into_function_and_file() -> None:
    f = parse_frame("_chain_future.<locals>._set_state (asyncio/futures.py:381)")
    assert (f.function, f.file) == ("_chain_future.<locals>._set_state", "asyncio/futures.py")
    g = parse_frame("_load_unlocked (<frozen importlib._bootstrap>:690)")
    assert (g.function, g.file) == ("_load_unlocked", "<frozen importlib._bootstrap>")


def test_overhead_share_and_percentiles() -> None:
    assert overhead_share(11.0, 10.0) == pytest.approx(0.1)
    assert overhead_share(9.0, 10.0) == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="bare p50"):
        overhead_share(1.0, 0.0)
    st = Stats.of([float(x) for x in range(1, 102)])
    assert (st.n, st.p50, st.min, st.max) == (101, 51.0, 1.0, 101.0)
    assert st.p99 == pytest.approx(100.0)
    with pytest.raises(ValueError, match="no samples"):
        Stats.of([])


def test_the_node_config_the_bench_sets_accepts_its_frames_and_no_bigger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args: argparse.Namespace = parse_args([])
    env = node_env(args.models / "m.onnx", args)
    for name in list(os.environ):
        if name.startswith("EDGEWISE_"):
            monkeypatch.delenv(name)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    limits = NodeConfig.load().limits.to_limits()
    frames = random_frames(FRAME_SHAPE, count=2)
    assert frames.shape == (2, *FRAME_SHAPE) and frames.dtype == np.uint8
    assert frames[0].nbytes == FRAME_BYTES
    payload = encode_frame(Frame(seq=1, ts=time.time(), tensor=frames[0]))
    assert len(payload) <= limits.max_payload_bytes
    got = decode_frame(payload, limits)
    assert np.array_equal(got.tensor, frames[0])
    bigger = np.zeros((225, 224, 3), dtype=np.uint8)
    with pytest.raises(ContractError) as err:
        decode_frame(encode_frame(Frame(seq=2, ts=time.time(), tensor=bigger)), limits)
    assert err.value.reason == "too_many_elements"
    as_floats = frames[0].astype(np.float32)  # same elements, four times the bytes
    with pytest.raises(ContractError) as err:
        decode_frame(encode_frame(Frame(seq=3, ts=time.time(), tensor=as_floats)), limits)
    assert err.value.reason == "payload_too_large"


def test_paced_calls_cycle_through_the_frames_once_per_tick() -> None:
    from bench.mobilenet import time_paced_calls

    frames = np.arange(3 * 4, dtype=np.uint8).reshape(3, 4)
    seen: list[int] = []
    out = time_paced_calls(lambda f: seen.append(int(f[0])), frames, 7, rate_hz=1000.0)
    assert seen == [0, 4, 8, 0, 4, 8, 0]
    assert len(out) == 7 and all(x >= 0.0 for x in out)


def test_the_bare_relay_answers_each_frame_in_the_nodes_results_format(
    mosquitto: BrokerInfo, mqtt_probe: Callable[..., MqttProbe]
) -> None:
    import queue
    import threading

    from bench.relay import RelaySpec, run_relay
    from edgewise.assets import bundled_asset
    from edgewise.cli.frames import load_holdout
    from schemas import decode_results

    relay_id = f"relay-test-{time.monotonic_ns()}"
    spec = RelaySpec(
        mosquitto.host, mosquitto.port, relay_id, str(bundled_asset("digits_edge.onnx"))
    )
    ready, stop, errors = threading.Event(), threading.Event(), queue.Queue()
    thread = threading.Thread(target=run_relay, args=(spec, ready, stop, errors), daemon=True)
    thread.start()
    try:
        assert ready.wait(30) and errors.empty()
        probe = mqtt_probe(mosquitto)
        probe.subscribe(f"edge/{relay_id}/results")
        holdout = load_holdout()
        for seq in range(3):
            frame = Frame(seq=seq, ts=time.time(), tensor=holdout.images[seq])
            probe.publish("relay/cam-9/digits", encode_frame(frame), qos=1)
        messages = probe.wait_count(3, 20)
    finally:
        stop.set()
        thread.join(10)
    assert errors.empty()
    results = [r for m in messages for r in decode_results(m.payload).results]
    assert [(r.device, r.sensor, r.frame_seq) for r in results] == [
        ("cam-9", "digits", s) for s in range(3)
    ]
    assert all(r.frame_ts is not None and r.latency_ms >= 0 for r in results)


def test_end_to_end_rows_name_every_baseline_in_order() -> None:
    from bench.mobilenet import EndToEnd, e2e_rows
    from bench.node_throughput import Latency

    def lat(kind: str, p50: float) -> Latency:
        return Latency(kind, 20.0, 100, 99, p50, p50, p50 + 1, p50 + 2, p50, 0.0, 99, 4.0, 5.0)  # type: ignore[arg-type]

    e = EndToEnd(
        node=lat("node", 7.5), mqtt=lat("baseline", 1.0), bare=Stats.of([2.0, 2.5]),
        relay=lat("relay", 5.25), paced=Stats.of([3.5]),
    )  # fmt: skip
    rows = e2e_rows(e)
    assert [r[0].split(" ")[0] for r in rows] == ["node:", "inside", "bare", "the", "bare", "bare"]
    assert [r[1] for r in rows] == ["7.50", "4.00", "2.25", "3.50", "5.25", "1.00"]
    assert rows[0][4] == "99/100" and rows[2][4] == "2"
    assert e.relay_overhead_ms == 7.5 - 5.25 and e.paced_overhead_ms == 7.5 - 3.5
