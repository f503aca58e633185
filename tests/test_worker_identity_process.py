"""Two `edgewise worker` processes with one worker id (a copied config, a restored VM image) on
the project's secured cloud broker (compose/mosquitto/cloud: passwords, ACL, TLS, the client-id
plugin): both connect as the same principal with the same client id and take each other over.
The conflict is said as ``degraded: client_id_conflict`` on the retained presence within 30 s
and in the worker's telemetry; one of them stops fighting after 5 takeovers; the broker logs
at most 10 (docs/adr/0073-client-id-conflict.md, docs/adr/0080-worker-status.md)."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud_worker import Worker
from cloud_worker.presence import Presence
from edgewise.local_broker import MosquittoProcess
from edgewise.mqtt.takeover import TAKEOVERS_BEFORE_PAUSE
from schemas import State, decode_status, decode_worker_telemetry
from tests.bridgeharness import Client, Got
from tests.securebroker import SecureBroker, make_pki
from tests.test_escalation import Finals, _escalator, eventually
from tests.test_worker_harness import worker_config

pytestmark = pytest.mark.timeout(180)
TAKEOVER_LINE = "already connected, closing old connection"
STOPPED = re.compile(r"taken over again \((\d+) takeovers;.*stopped fighting")
WORKER = "worker-1"  # a principal of the shipped cloud ACL


def _log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _wait_log(procs: list[subprocess.Popen[bytes]], logs: list[Path], check: Callable[[], bool],
              timeout_s: float, what: str) -> None:  # fmt: skip
    """Poll the workers' log files (a log line has no event to wait on)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        for p, path in zip(procs, logs, strict=True):
            assert p.poll() is None, f"worker exited {p.returncode}:\n{_log(path)[-3000:]}"
        assert time.monotonic() < deadline, f"timed out: {what}\n" + "\n".join(
            _log(p)[-2000:] for p in logs
        )
        time.sleep(0.1)


def _conflict_status(m: Got) -> bool:
    return (
        m.topic == f"cloud/workers/{WORKER}/status"
        and bool(m.payload)
        and decode_status(m.payload).state == "degraded"
        and "client_id_conflict" in decode_status(m.payload).reasons
    )


def _telemetry(m: Got) -> bool:
    return m.topic == f"cloud/workers/{WORKER}/telemetry"


def test_two_workers_with_one_id_report_the_conflict_and_stop_fighting(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    passwords = {WORKER: secrets.token_urlsafe(12), "operator": secrets.token_urlsafe(12)}
    broker = SecureBroker("cloud", tmp_path / "cloud", passwords, pki)
    broker.start()
    password_file = tmp_path / "worker-1.password"
    password_file.write_text(passwords[WORKER])
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWISE_")}
    env |= {
        "EDGEWISE_WORKER_WORKER_ID": WORKER,
        "EDGEWISE_WORKER_MQTT__HOST": "localhost",  # a name on the broker's certificate
        "EDGEWISE_WORKER_MQTT__PORT": str(broker.tls_port),
        "EDGEWISE_WORKER_MQTT__TLS_CA_FILE": str(pki.ca_cert),
        "EDGEWISE_WORKER_MQTT__USERNAME": WORKER,
        "EDGEWISE_WORKER_MQTT__PASSWORD_FILE": str(password_file),
        "EDGEWISE_WORKER_MQTT__TAKEOVER_BACKOFF_FIRST_S": "0.25",
        "EDGEWISE_WORKER_TELEMETRY_INTERVAL_S": "1",
        "COLUMNS": "400",  # one log line per record
    }
    watcher = Client(
        broker.tls,
        client_id="operator:watch",
        username="operator",
        password=passwords["operator"],
        tls_ca=pki.ca_cert,
    )
    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    try:
        watcher.connect()
        watcher.subscribe(f"cloud/workers/{WORKER}/#")

        def start(i: int) -> None:
            with logs[i].open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "edgewise.cli.app", "worker"],
                        env={**env, "EDGEWISE_WORKER_STORE__PATH": str(tmp_path / f"{i}.db")},
                        cwd=tmp_path,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )

        start(0)
        _wait_log(procs, logs[:1], lambda: "ready on" in _log(logs[0]), 60, "worker a ready")
        watcher.wait(lambda: watcher.count(_telemetry) > 0, 30, "telemetry of worker a")
        start(1)
        watcher.wait(lambda: watcher.count(_conflict_status) > 0, 30, "client_id_conflict said")

        _wait_log(procs, logs, lambda: any(STOPPED.search(_log(p)) for p in logs), 90,
                  "one worker stops fighting")  # fmt: skip
        gave_way = [STOPPED.search(_log(p)) for p in logs]
        # The other serves on: its telemetry says the conflict, and three windows later (3 s)
        # nobody fights any more.
        fights = broker.log_text().count(TAKEOVER_LINE)
        seen = watcher.count(_telemetry)
        watcher.wait(lambda: watcher.count(_telemetry) >= seen + 3, 30, "three more windows")
        fights_after = broker.log_text().count(TAKEOVER_LINE)
        windows = [decode_worker_telemetry(m.payload) for m in watcher.messages if _telemetry(m)]
        # What a node that connects now reads: the retained presence.
        fresh = Client(
            broker.tls,
            client_id="operator:fresh",
            username="operator",
            password=passwords["operator"],
            tls_ca=pki.ca_cert,
        )
        fresh.connect()
        fresh.subscribe(f"cloud/workers/{WORKER}/status")
        fresh.wait(lambda: fresh.count() > 0, 10, "the retained presence")
        retained = decode_status(fresh.messages[0].payload)
        fresh.c.disconnect()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        watcher.c.disconnect()
        broker.stop()

    print(f"takeovers in the broker log: {fights}, then {fights_after}")
    assert [g is not None for g in gave_way].count(True) == 1  # one gave way, one serves
    stopped_at = next(int(g.group(1)) for g in gave_way if g is not None)
    assert stopped_at >= TAKEOVERS_BEFORE_PAUSE
    assert fights_after <= 2 * TAKEOVERS_BEFORE_PAUSE, fights_after
    assert fights_after == fights  # it stopped fighting
    conflicted = [w for w in windows if "client_id_conflict" in w.reasons]
    assert conflicted and all(w.state == "degraded" for w in conflicted)
    assert max(w.counts["takeovers"] for w in conflicted) >= 1
    assert retained.state == "degraded" and retained.reasons == ["client_id_conflict"]
    assert retained.runtime == "worker" and retained.node == WORKER


def test_a_node_counts_a_degraded_worker_as_one_that_answers(
    fresh_mosquitto: MosquittoProcess,
) -> None:
    """The escalator as shipped (it counts every presence but ``offline``) reads the worker's
    ``degraded: client_id_conflict`` as a live worker, and its ``offline`` as gone."""
    ids = (WORKER, "worker-2")
    said = {w: Presence(f"cloud/workers/{w}/status", w, "boot-1") for w in ids}
    publisher = Client(fresh_mosquitto.info)
    publisher.connect()

    def say(worker: str, state: State, reasons: list[str]) -> None:
        p = said[worker]
        publisher.publish(p.topic, p.payload(state, reasons), retain=True)

    async def scenario() -> None:
        async with _escalator(fresh_mosquitto.info, Finals(), cache_entries=0) as esc:
            for w in ids:  # one publisher: in order, so worker-2 seen means worker-1 seen
                say(w, "degraded", ["client_id_conflict"])
            await eventually(lambda: len(esc.workers) == 2, "both workers' presence seen")
            assert esc.workers_online == 2 and esc.stats.presence_rejects == 0
            assert esc.unavailable is None
            for w in ids:
                say(w, "offline", ["shutdown"])
            await eventually(lambda: esc.workers_online == 0, "no worker online")
            assert esc.unavailable == "no_workers"  # a drop from two live workers to none

    try:
        asyncio.run(scenario())
    finally:
        publisher.c.disconnect()


def test_the_presence_and_telemetry_follow_the_conflict_as_it_starts_and_clears(
    fresh_mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    """The reasons are said again when they change, without a reconnect: a conflict counted
    (as the takeover guard counts it) makes the presence and the next window ``degraded``; once
    it is over (ADR 0073: 600 s without a takeover) the presence says ``online`` again."""
    broker = fresh_mosquitto.info
    cfg = worker_config(broker, tmp_path, telemetry_interval_s=0.5)
    watcher = Client(broker)
    watcher.connect()
    watcher.subscribe(f"cloud/workers/{cfg.worker_id}/#")

    def said(state: str, start: int) -> Callable[[], bool]:
        def check() -> bool:
            for m in watcher.messages[start:]:
                if m.topic.endswith("/status") and decode_status(m.payload).state == state:
                    return True
            return False

        return check

    def window_says(reasons: list[str], start: int) -> Callable[[], bool]:
        return lambda: any(
            decode_worker_telemetry(m.payload).reasons == reasons
            for m in watcher.messages[start:]
            if m.topic.endswith("/telemetry")
        )

    async def scenario() -> None:
        async with Worker(cfg) as worker:
            await asyncio.to_thread(watcher.wait, said("online", 0), 10, "online")
            conflict = worker.session._takeover.shared  # what the guard counts
            conflict.takeovers, conflict.last_at = 1, conflict.clock()
            start = watcher.count()
            await asyncio.to_thread(watcher.wait, said("degraded", start), 10, "degraded")
            await asyncio.to_thread(
                watcher.wait, window_says(["client_id_conflict"], start), 10, "in telemetry"
            )
            assert worker.describe()["client_id_conflict"] is True
            conflict.takeovers = 0  # over (the guard clears it after 600 s without one)
            start = watcher.count()
            await asyncio.to_thread(watcher.wait, said("online", start), 10, "online again")
            await asyncio.to_thread(watcher.wait, window_says([], start), 10, "telemetry clear")
            assert await worker.drain()

    try:
        asyncio.run(scenario())
    finally:
        watcher.c.disconnect()
