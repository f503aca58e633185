"""Operator commands to `edgewise node` as a real process on a real Mosquitto: sent at QoS 1
while the node is stopped, they all run once, in order, after it restarts; a copy runs no more;
a kill -9 between receipt and execution runs the command once after the restart; a flood of
garbage on the command topic costs no genuine command, few log lines, no raw control character
in the log."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgewise.local_broker import BrokerInfo, Message, MqttProbe
from edgewise.releases import Command, decode_event, generate, sign
from edgewise.releases.signing import key_id, public_pem, raw_public
from edgewise.releases.wire import Envelope, Signature, encode
from schemas import decode_telemetry
from tests.nodeprocs import EnrolledNodes, event_kind, is_event, online
from tests.updatekit import Fleet, command, now

pytestmark = pytest.mark.timeout(150)
Start = Callable[..., subprocess.Popen[bytes]]
CONTROL = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
"""Control characters no log line may hold raw (newline, tab and CR are the log's own)."""


@pytest.fixture
def enrolled(
    mosquitto: BrokerInfo, tmp_path: Path, mqtt_probe: Callable[..., MqttProbe]
) -> Iterator[tuple[Start, Fleet, str, MqttProbe, MqttProbe]]:
    """Start a node enrolled for updates (its key set published); give the watcher (events,
    status, telemetry) and the operator's probe."""
    fleet = Fleet()
    tag = uuid.uuid4().hex[:8]
    node_id = f"cmd-{tag}"
    root_pub = tmp_path / "root.pub"
    root_pub.write_bytes(public_pem(fleet.root))
    nodes = EnrolledNodes(mosquitto, tmp_path, f"fleet-{tag}", f"models-{tag}")

    def start(**extra: str) -> subprocess.Popen[bytes]:
        log_name = f"node-{len(nodes.procs)}.log"
        return nodes.start(node_id, root_pub, log_name=log_name, COLUMNS="400", **extra)

    watcher = mqtt_probe()
    for what in ("status", "events", "telemetry"):  # not the command topic: its flood
        watcher.subscribe(f"edge/{node_id}/{what}")
    operator = mqtt_probe()
    operator.publish(f"fleet-{tag}/keys", fleet.signed_key_set(now=now()), retain=True)
    yield start, fleet, node_id, watcher, operator
    nodes.kill_all()


def _done_refs(watcher: MqttProbe) -> list[str | None]:
    return [decode_event(m.payload).ref for m in watcher.messages if is_event("command_done")(m)]


def _command(node_id: str, **kw: Any) -> Command:
    return command(node_id, now(), **kw)


def _up(start: Start, watcher: MqttProbe, **extra: str) -> subprocess.Popen[bytes]:
    proc = start(**extra)
    watcher.wait_for(online, 30)
    return proc


def test_commands_sent_while_the_node_is_stopped_run_once_in_order_after_it_restarts(
    enrolled: tuple[Start, Fleet, str, MqttProbe, MqttProbe],
) -> None:
    start, fleet, node_id, watcher, operator = enrolled
    proc = _up(start, watcher)
    watcher.wait_for(is_event("keys_updated"), 30)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0

    cmds = [_command(node_id) for _ in range(20)]
    operator.publish_many(f"edge/{node_id}/cmd", [sign(c, fleet.release) for c in cmds], qos=1)
    watcher.clear()
    _up(start, watcher)
    watcher.wait_for(is_event("command_done"), 60, count=20)
    operator.publish(f"edge/{node_id}/cmd", sign(cmds[7], fleet.release))  # a copy
    watcher.wait_for(is_event("command_rejected:replayed"), 30)
    marker = _command(node_id)
    operator.publish(f"edge/{node_id}/cmd", sign(marker, fleet.release))
    watcher.wait_for(
        lambda m: is_event("command_done")(m) and decode_event(m.payload).ref == marker.id
    )
    assert _done_refs(watcher) == [c.id for c in cmds] + [marker.id]


def test_kill_9_between_receipt_and_execution_runs_the_command_once_after_restart(
    enrolled: tuple[Start, Fleet, str, MqttProbe, MqttProbe], tmp_path: Path
) -> None:
    start, fleet, node_id, watcher, operator = enrolled
    proc = _up(start, watcher, EDGEWISE_CRASHPOINT="updates.command.before_run")
    watcher.wait_for(is_event("keys_updated"), 30)
    cmd = _command(node_id)
    operator.publish(f"edge/{node_id}/cmd", sign(cmd, fleet.release))
    assert proc.wait(30) == -signal.SIGKILL  # recorded and acknowledged, then killed
    journal = tmp_path / "state" / f"{node_id}.updates" / "commands.db"
    with sqlite3.connect(journal) as db:
        assert list(db.execute("SELECT id, state FROM commands")) == [(cmd.id, "received")]
    watcher.clear()
    _up(start, watcher)
    marker = _command(node_id)
    operator.publish(f"edge/{node_id}/cmd", sign(marker, fleet.release))
    watcher.wait_for(
        lambda m: is_event("command_done")(m) and decode_event(m.payload).ref == marker.id
    )
    assert _done_refs(watcher) == [cmd.id, marker.id]


def _bad_signature(node_id: str, fleet: Fleet) -> bytes:
    """A command naming the trusted release key, with a signature that does not match."""
    signed = sign(_command(node_id), generate())
    from edgewise.releases.wire import decode_envelope

    env = decode_envelope(signed)
    trusted = key_id(raw_public(fleet.release))
    return encode(
        Envelope(kind=env.kind, payload=env.payload, sigs=[Signature(k=trusted, s=b"\x01" * 64)])
    )


def test_a_garbage_flood_on_the_command_topic_costs_no_genuine_command(
    enrolled: tuple[Start, Fleet, str, MqttProbe, MqttProbe], tmp_path: Path
) -> None:
    start, fleet, node_id, watcher, operator = enrolled
    _up(start, watcher, EDGEWISE_TELEMETRY__WINDOW_S="0.5")
    watcher.wait_for(is_event("keys_updated"), 30)
    stranger = generate()
    evil_id = "\x1b[2J\rFORGED\nLINE\x07\x00" + uuid.uuid4().hex[:8]
    genuine = [_command(node_id) for _ in range(5)] + [_command(node_id, id=evil_id)]
    garbage: list[bytes] = []
    for i in range(2500):
        if i % 3 == 0:
            garbage.append(b"\x1b[31m\x00garbage\n\xff" + str(i).encode())  # malformed
        elif i % 3 == 1:
            garbage.append(sign(_command(node_id, id=f"\x1b]0;x{i:08d}"), stranger))  # unknown key
        else:
            garbage.append(_bad_signature(node_id, fleet))  # bad_signature
    payloads: list[bytes] = []
    for i, g in enumerate(garbage):
        if i % 500 == 250:
            payloads.append(sign(genuine[len(payloads) - i], fleet.release))
        payloads.append(g)
    payloads.append(sign(genuine[-1], fleet.release))
    assert len(payloads) == len(garbage) + len(genuine)

    started = time.monotonic()
    operator.publish_many(f"edge/{node_id}/cmd", payloads, qos=1, timeout_s=60)
    watcher.wait_for(is_event("command_done"), 60, count=len(genuine))
    # Once it ran, a copy of the command whose id holds control characters is a replay: the
    # refusal quotes the id.
    operator.publish(f"edge/{node_id}/cmd", sign(genuine[-1], fleet.release))
    watcher.wait_for(is_event("command_rejected:replayed"), 30)
    sent = len(garbage) + 1

    windows: dict[int, int] = {}  # telemetry messages seen -> control_rejects in each

    def rejects_counted(m: Message) -> bool:
        if m.topic.endswith("/telemetry") and id(m) not in windows:
            windows[id(m)] = decode_telemetry(m.payload).counts.get("control_rejects", 0)
        return sum(windows.values()) >= sent

    watcher.wait_for(rejects_counted, 60)
    elapsed = time.monotonic() - started

    assert sorted(r for r in _done_refs(watcher) if r) == sorted(c.id for c in genuine)
    log = b"".join(p.read_bytes() for p in tmp_path.glob("node-*.log"))
    assert not any(c in log for c in CONTROL), [chr(c) for c in CONTROL if c in log]
    lines = [x for x in log.decode().splitlines() if "rejected command on" in x]
    by_reason = Counter(x.split("rejected command on ", 1)[1].split(": ")[1] for x in lines)
    assert set(by_reason) == {"malformed", "unknown_key", "bad_signature", "replayed"}
    for reason, n in by_reason.items():
        assert n <= 1 + elapsed, (reason, n, elapsed)
    reported = [
        m
        for m in watcher.messages
        if m.topic.endswith("/events") and not m.retain and event_kind(m).startswith("command_rej")
    ]
    assert len(reported) <= len(by_reason) * (10 + elapsed), (len(reported), elapsed)
    print(
        f"flood: {sent} rejected in {elapsed:.1f} s; log lines by reason {dict(by_reason)};"
        f" events {len(reported)}"
    )
