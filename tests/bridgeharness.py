"""Helpers of the bridge tests: config files, the bridge as a real subprocess, MQTT clients.

:class:`Client` is a small synchronous paho client (credentials, TLS, MQTT 5 or 3.1.1) whose
waits block on a condition fed by paho's network thread, with cheap predicates (counters), so
waiting for 10,000 messages is not quadratic.
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgewise.local_broker import BrokerInfo
from edgewise.local_broker.probe import unique_client_id
from tests.waiting import eventually_sync

REPO = Path(__file__).resolve().parents[1]


def toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Rule:
    direction: str
    filter: str
    template: str | None = None
    qos: int = 1
    retain: bool = True


def write_bridge_config(
    path: Path,
    site: BrokerInfo,
    cloud: BrokerInfo,
    rules: Sequence[Rule],
    *,
    bridge_id: str = "br-test",
    site_name: str = "s1",
    protocol: str = "auto",
    queue_dir: Path | None = None,
    top: str = "",
    forward: str = "",
    queue: str = "",
    site_extra: str = "",
    cloud_extra: str = "",
) -> Path:
    """A bridge TOML for these brokers and rules; ``top``/``forward``/… add raw TOML lines."""
    qdir = queue_dir if queue_dir is not None else path.parent / "queues"
    lines = [
        f"bridge_id = {toml_str(bridge_id)}",
        f"site = {toml_str(site_name)}",
        "telemetry_interval_s = 1.0",
        "drain_timeout_s = 5.0",
        top,
        "[site_broker]",
        f"host = {toml_str(site.host)}",
        f"port = {site.port}",
        f"protocol = {toml_str(protocol)}",
        "reconnect_first_s = 0.2",
        "reconnect_cap_s = 1.0",
        site_extra,
        "[cloud_broker]",
        f"host = {toml_str(cloud.host)}",
        f"port = {cloud.port}",
        f"protocol = {toml_str(protocol)}",
        "reconnect_first_s = 0.2",
        "reconnect_cap_s = 1.0",
        cloud_extra,
        "[queue]",
        f"dir = {toml_str(str(qdir))}",
        'synchronous = "NORMAL"',
        queue,
        "[forward]",
        forward,
    ]
    for rule in rules:
        lines += [
            "[[rules]]",
            f"direction = {toml_str(rule.direction)}",
            f"filter = {toml_str(rule.filter)}",
            f"qos = {rule.qos}",
            f"retain = {'true' if rule.retain else 'false'}",
        ]
        if rule.template is not None:
            lines.append(f"template = {toml_str(rule.template)}")
    path.write_text("\n".join(lines) + "\n")
    return path


class BridgeProcess:
    """``edgewise bridge --config PATH`` as a real subprocess (so ``kill -9`` is real)."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        env = dict(os.environ)
        env.update(self.env or {})
        env["COLUMNS"] = "200"
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts + 1} ---\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgewise.cli.app", "bridge", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
            )
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def wait_started(self, timeout_s: float = 20.0) -> None:
        """Until this start's log says the bridge runs (its SIGTERM handler is in place then)."""
        marker = f"--- start {self.starts} ---"

        def started_or_gone() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                return True
            text = self.log_text()
            return "up rule(s)" in text[text.rfind(marker) :]

        eventually_sync(
            started_or_gone,
            "the bridge to start",
            timeout_s=timeout_s,
            detail=lambda: self.log_text()[-3000:],
        )

    def terminate(self, timeout_s: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.wait_started()
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass(frozen=True, slots=True)
class Got:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    at: float = 0.0  # time.monotonic() at arrival
    dup: bool = False  # the broker sent it again (MQTT DUP flag): not a new publish


@dataclass
class Client:
    """A synchronous paho client with a background network loop, for tests."""

    broker: BrokerInfo
    client_id: str = ""
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5
    clean: bool = True
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    tls_server_name: str | None = None
    port: int | None = None
    messages: list[Got] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.client_id = self.client_id or unique_client_id("bt")
        self._cond = threading.Condition()
        self.connack: Any = None
        self.disconnects: list[Any] = []
        self._subacks: dict[int, list[Any]] = {}
        self._pubacks: set[int] = set()
        self.payloads: set[bytes] = set()  # distinct payloads received (cheap to wait on)
        kwargs: dict[str, Any] = {"client_id": self.client_id, "protocol": self.protocol}
        if self.protocol != MQTTProtocolVersion.MQTTv5:
            kwargs["clean_session"] = self.clean
        c = paho.Client(CallbackAPIVersion.VERSION2, **kwargs)
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(min_delay=1, max_delay=1)
        if self.username is not None:
            c.username_pw_set(self.username, self.password)
        if self.tls_ca is not None:
            c.tls_set(ca_certs=str(self.tls_ca), cert_reqs=ssl.CERT_REQUIRED)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        self.c = c

    # callbacks
    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._cond:
            self.connack = rc
            self._cond.notify_all()

    def _on_disconnect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._cond:
            self.disconnects.append(rc)
            self._cond.notify_all()

    def _on_message(self, c: Any, u: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.payloads.add(bytes(msg.payload))
            self.messages.append(
                Got(
                    msg.topic,
                    bytes(msg.payload),
                    bool(msg.retain),
                    msg.qos,
                    time.monotonic(),
                    bool(msg.dup),
                )
            )
            self._cond.notify_all()

    def _on_subscribe(self, c: Any, u: Any, mid: int, codes: Any, props: Any) -> None:
        with self._cond:
            self._subacks[mid] = list(codes)
            self._cond.notify_all()

    def _on_publish(self, c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
        with self._cond:
            self._pubacks.add(mid)
            self._cond.notify_all()

    # API
    def wait(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(ready, timeout=timeout_s):
                raise AssertionError(f"{self.client_id}: timed out after {timeout_s}s: {what}")

    def connect(self, timeout_s: float = 10.0, *, expect_ok: bool = True) -> Any:
        kwargs: dict[str, Any] = {}
        if self.protocol == MQTTProtocolVersion.MQTTv5:
            kwargs["clean_start"] = self.clean
            if not self.clean:
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties

                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 3600
                kwargs["properties"] = props
        self.c.connect(self.broker.host, self.port or self.broker.port, 30, **kwargs)
        self.c.loop_start()
        self.wait(lambda: self.connack is not None or bool(self.disconnects), timeout_s, "CONNACK")
        if expect_ok:
            assert self.connack is not None and not self.connack.is_failure, (
                f"connect refused: {self.connack} {self.disconnects}"
            )
        return self.connack

    def subscribe(self, topic_filter: str, qos: int = 1, *, no_local: bool = False) -> int:
        if self.protocol == MQTTProtocolVersion.MQTTv5:
            rc, mid = self.c.subscribe(
                topic_filter, options=SubscribeOptions(qos=qos, noLocal=no_local)
            )
        else:
            rc, mid = self.c.subscribe(topic_filter, qos)
        assert rc == paho.MQTT_ERR_SUCCESS and mid is not None
        self.wait(lambda: mid in self._subacks, 10.0, f"SUBACK {topic_filter}")
        code = self._subacks[mid][0]
        return int(code.value)

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, wait: bool = True
    ) -> int:
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        assert info.rc == paho.MQTT_ERR_SUCCESS, info.rc
        if wait and qos > 0:
            self.wait(lambda: info.mid in self._pubacks, 10.0, f"PUBACK {topic}")
        return info.mid

    def wait_acked(self, n: int, timeout_s: float) -> None:
        """Wait until ``n`` distinct publishes were acknowledged."""
        self.wait(lambda: len(self._pubacks) >= n, timeout_s, f"{n} PUBACKs")

    def acked(self, mid: int) -> bool:
        with self._cond:
            return mid in self._pubacks

    def count(self, pred: Callable[[Got], bool] | None = None) -> int:
        with self._cond:
            if pred is None:
                return len(self.messages)
            return sum(1 for m in self.messages if pred(m))

    def wait_count(self, n: int, timeout_s: float) -> None:
        self.wait(lambda: len(self.messages) >= n, timeout_s, f"{n} messages (have {self.count()})")

    def wait_payload(self, payload: bytes, timeout_s: float, start: int = 0) -> Got:
        found: list[Got] = []
        scanned = [start]

        def ready() -> bool:
            for m in self.messages[scanned[0] :]:
                if m.payload == payload:
                    found.append(m)
                    return True
            scanned[0] = len(self.messages)
            return False

        self.wait(ready, timeout_s, f"payload {payload[:40]!r}")
        return found[0]

    def snapshot(self) -> list[Got]:
        with self._cond:
            return list(self.messages)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.c.disconnect()
        self.c.loop_stop()


def one_crosses(
    sender: Client, receiver: Client, topic: str, tag: bytes, attempts: int = 40
) -> bool:
    """Publish ``<tag>-<n>`` on ``topic`` until ``receiver`` gets one within 0.5 s (a bridge's
    subscription may still be on its way), at most ``attempts`` times; whether one crossed."""
    for attempt in range(attempts):
        payload = b"%s-%d" % (tag, attempt)
        sender.publish(topic, payload)
        try:
            receiver.wait_payload(payload, 0.5)
            return True
        except AssertionError:
            continue
    return False


def retained_state(
    broker: BrokerInfo, topic_filter: str, marker_topic: str, timeout_s: float = 10.0
) -> dict[str, bytes]:
    """Every retained message under ``topic_filter`` now, as ``{topic: payload}``.

    Retained messages come right after the SUBACK, before anything live; ``marker_topic`` (a
    topic under the filter that holds a retained marker) arrives among them, and a live message
    published to it after subscribing closes the set (no bare sleep).
    """
    c = Client(broker)
    c.connect()
    try:
        c.subscribe(topic_filter)
        end = f"end-{time.monotonic_ns()}".encode()
        c.publish(marker_topic, end)
        c.wait_payload(end, timeout_s)
        got = c.snapshot()
    finally:
        c.close()
    state: dict[str, bytes] = {}
    for m in got:
        if m.payload == end:
            break
        if m.retain:
            state[m.topic] = m.payload
    return state
