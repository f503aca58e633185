"""A bare MQTT inference relay: the floor for any MQTT-based inference service.

A paho client subscribes to frames, runs one ONNX Runtime session on each in paho's own
callback (no micro-batching, no thread hand-off, no checks beyond decoding, no durable store)
and publishes one results message per frame at QoS 1, in the node's wire format, so the same
consumer measures it. ``bench.mobilenet`` puts it beside the node: the node's overhead over this
relay is what the node's own design costs; the relay's own overhead over the bare call is what
any such service pays here (the frame's and the result's broker hops, paho, the decode).
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.workers import _close, connect
from schemas import Result, ResultBatch, decode_frame, encode_results, new_id
from schemas.limits import Limits


@dataclass(frozen=True, slots=True)
class RelaySpec:
    host: str
    port: int
    node_id: str
    """Results go to ``edge/{node_id}/results``, as a node's would."""
    model: str
    threads: int = 1
    max_payload_bytes: int = 262_144
    max_tensor_elements: int = 150_528


def run_relay(spec: RelaySpec, ready: Event, stop: Event, errors: Any) -> None:
    """Serve until ``stop`` is set; put a traceback on ``errors`` if anything fails."""
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = spec.threads
        session = ort.InferenceSession(spec.model, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        limits = Limits(
            max_payload_bytes=spec.max_payload_bytes, max_tensor_elements=spec.max_tensor_elements
        )
        topic_out = f"edge/{spec.node_id}/results"
        client, _ = connect(spec.host, spec.port, f"relay-{spec.node_id}", max_inflight=1000)
        seq = 0

        def on_message(c: Any, userdata: Any, msg: Any) -> None:
            nonlocal seq
            received = time.monotonic()
            frame = decode_frame(msg.payload, limits)
            scores = session.run(None, {name: frame.tensor[None]})[0][0]
            label = int(np.argmax(scores))
            _, device, sensor = msg.topic.split("/")
            seq += 1
            result = Result(
                id=new_id(), seq=seq, device=device, sensor=sensor, frame_seq=frame.seq,
                frame_ts=frame.ts, model="relay", release=1, label=label,
                confidence=float(scores[label]), source="edge",
                latency_ms=(time.monotonic() - received) * 1000.0,
            )  # fmt: skip
            payload = encode_results(ResultBatch(node=spec.node_id, results=[result]))
            c.publish(topic_out, payload, qos=1)

        client.on_message = on_message
        client.subscribe("relay/+/+", qos=1)
        client.loop(1.0)  # the SUBACK
        ready.set()
        while not stop.is_set():
            client.loop(0.05)
        _close(client)
    except Exception:
        errors.put(traceback.format_exc(limit=4))
        ready.set()
