"""ResultSink: a results consumer for tests and benchmarks that counts what it received and, in
end-to-end mode, confirms it (docs/adr/0078-end-to-end-acks.md).

It subscribes to a results filter (QoS 1, by default on a persistent session) and for every
valid results message records which result ids it saw per node and frame; once recorded (its
"durable" store is this process's memory: a test or benchmark that outlives the brokers it
kills), it publishes the message's id (:func:`schemas.message_id`) on the node's
``.../acks`` topic when ``confirm`` is on. Confirmations are batched per node: at most every
``linger_s`` or :data:`schemas.ACK_IDS_MAX` ids.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgewise.local_broker.info import BrokerInfo
from edgewise.local_broker.probe import MqttProbe
from schemas import (
    ACK_IDS_MAX,
    ContractError,
    ResultAcks,
    decode_results,
    encode_acks,
    message_id,
)


def acks_topic_of(results_topic: str) -> str:
    """``edge/gw-1/results`` → ``edge/gw-1/acks`` (the last level replaced)."""
    return results_topic.rsplit("/", 1)[0] + "/acks"


class ResultSink(MqttProbe):
    """``sink = ResultSink(broker, "sink-1", confirm=True); sink.connect();
    sink.subscribe("edge/+/results")``; read :attr:`frames` (frame seq → result ids)."""

    def __init__(
        self,
        broker: BrokerInfo,
        client_id: str | None = None,
        *,
        confirm: bool = True,
        linger_s: float = 0.05,
        clean_session: bool = False,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311,
    ) -> None:
        super().__init__(broker, client_id, clean_session=clean_session, protocol=protocol)
        self.confirm = confirm
        self._linger_s = linger_s
        self.frames: dict[int, set[str]] = defaultdict(set)
        """frame seq → the result ids that answered it (all nodes together)."""
        self.results = 0
        """Results received, duplicates included."""
        self.messages_taken = 0
        self.invalid = 0
        self.acks_sent = 0
        self._to_confirm: dict[str, list[str]] = defaultdict(list)
        self._filters: dict[str, int] = {}
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, daemon=True)
        self._flusher.start()

    def subscribe(self, topic_filter: str, qos: int = 1, timeout_s: float = 5.0) -> int:
        """Subscribe (and again after any reconnect to a broker that lost the session)."""
        self._filters[topic_filter] = qos
        return super().subscribe(topic_filter, qos, timeout_s)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        super()._on_connect(client, userdata, flags, reason, properties)
        if not reason.is_failure and not flags.session_present:
            for topic_filter, qos in self._filters.items():  # a broker restarted without it
                client.subscribe(topic_filter, qos)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if not msg.topic.endswith("/results"):
            super()._on_message(client, userdata, msg)
            return
        try:
            batch = decode_results(bytes(msg.payload))
        except ContractError:
            with self._cond:
                self.invalid += 1
            return
        with self._cond:
            self.messages_taken += 1
            self.results += len(batch.results)
            for r in batch.results:
                self.frames[r.frame_seq].add(r.id)
            if self.confirm:
                self._to_confirm[acks_topic_of(msg.topic)].append(message_id(batch))
            self._cond.notify_all()

    def _flush_loop(self) -> None:
        while not self._stop.wait(self._linger_s):
            self.flush()

    def flush(self) -> None:
        """Publish the confirmations gathered so far (QoS 1, not waited for)."""
        with self._cond:
            pending, self._to_confirm = self._to_confirm, defaultdict(list)
        for topic, ids in pending.items():
            for start in range(0, len(ids), ACK_IDS_MAX):
                chunk = ids[start : start + ACK_IDS_MAX]
                payload = encode_acks(ResultAcks(ids=chunk, by="sink"))
                self.client.publish(topic, payload, qos=1)
                self.acks_sent += 1

    def answered(self) -> int:
        """Distinct frames answered so far."""
        with self._cond:
            return len(self.frames)

    def twice(self) -> dict[int, set[str]]:
        """Frames answered under more than one result id."""
        with self._cond:
            return {seq: set(ids) for seq, ids in self.frames.items() if len(ids) > 1}

    def wait_answered(self, n: int, timeout_s: float) -> int:
        """Wait until ``n`` distinct frames are answered (or ``timeout_s``); how many are."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.frames) >= n, timeout=timeout_s)
            return len(self.frames)

    def close(self) -> None:
        self._stop.set()
        self._flusher.join(2)
        super().close()
