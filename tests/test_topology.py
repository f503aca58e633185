"""The whole secured compose topology as local processes, in the default test run.

What `docker compose up` starts, without Docker: the site and cloud Mosquitto from
compose/mosquitto/{site,cloud} (passwords, ACLs, TLS, the edgewise_clientid plugin), the
bridge, two edge nodes enrolled for model updates, two cloud workers and two sensors, each as an
`edgewise` process from the very config files compose mounts (only hosts, ports and paths
moved by environment variables), with the credentials compose/make-secrets.sh makes, run into a
temporary directory. An operator drives it with the CLI over TLS with its own credentials.

Through it: frames become results at the cloud; unsure cases go to the workers and come back;
a key set and a signed release published at the cloud reach both nodes through the bridge and
both commit it; a command for one node reaches it through the bridge and runs once; `edgewise
fleet status` at the cloud shows both nodes. Over the whole run: no client was taken over or
refused by either broker, and no node's status went offline once it was online.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgewise.releases import decode_event
from schemas import decode_replies, decode_results, decode_status
from tests.bridgeharness import REPO, Client, Got
from tests.securebroker import SecureBroker
from tests.waiting import eventually_logged

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

COMPOSE = REPO / "compose"
NODES = ("gw-1", "gw-2")
WORKERS = ("worker-1", "worker-2")
SENSORS = ("cam-1", "cam-2")
FRAMES = 150  # per sensor
TAKEOVER = "already connected, closing old connection"
REFUSED = "edgewise_clientid: refused"


@dataclass
class Stack:
    root: Path
    secrets: Path
    site: SecureBroker
    cloud: SecureBroker

    @property
    def ca(self) -> Path:
        return self.secrets / "certs" / "ca.crt"

    def password_file(self, principal: str, side: str = "site") -> Path:
        if principal == "bridge-s1":
            return self.secrets / f"bridge_{side}_password"
        return self.secrets / f"{principal}_password"

    def observer(self, side: str, name: str) -> Client:
        broker = self.site if side == "site" else self.cloud
        c = Client(
            broker.tls,
            client_id=f"operator:{name}",
            username="operator",
            password=self.password_file("operator").read_text().strip(),
            tls_ca=self.ca,
            tls_server_name="localhost",
        )
        c.connect()
        return c


def _cli_env() -> dict[str, str]:
    """The environment of every process started here: no EDGEWISE_ settings of the caller's,
    and this interpreter's scripts (the `edgewise` command make-secrets.sh uses) on the PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWISE_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("topology")
    secrets = root / "secrets"
    made = subprocess.run(
        ["bash", str(COMPOSE / "make-secrets.sh"), "--local", "--out", str(secrets)],
        env=_cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    site = SecureBroker("site", root / "site", secrets=secrets)
    cloud = SecureBroker("cloud", root / "cloud", secrets=secrets)
    site.start()
    cloud.start()
    try:
        yield Stack(root, secrets, site, cloud)
    finally:
        site.stop()
        cloud.stop()


class Services:
    """edgewise processes, each with its own log file."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        with (self.dir / f"{name}.log").open("wb") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "edgewise.cli.app", *args],
                env={**_cli_env(), **env},
                cwd=self.dir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")

    def wait_log(self, name: str, text: str, timeout_s: float = 60.0) -> None:
        eventually_logged(text, lambda: self.log(name), self.procs[name], name, timeout_s=timeout_s)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _broker_env(prefix: str, port: int, user: str, password_file: Path) -> dict[str, str]:
    """Where a compose config's [mqtt]-like section points, moved to this run's broker."""
    return {
        f"{prefix}HOST": "localhost",  # a name on the broker's certificate (make-secrets.sh)
        f"{prefix}PORT": str(port),
        f"{prefix}USERNAME": user,
        f"{prefix}PASSWORD_FILE": str(password_file),
        f"{prefix}RECONNECT_FIRST_S": "0.2",
        f"{prefix}RECONNECT_CAP_S": "2",
    }


def _operator(stack: Stack, args: list[str], timeout_s: float = 120) -> str:
    """Run an operator command against the cloud broker over TLS with the operator's own
    credentials; return what it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "edgewise.cli.app", *args,
         "--broker", f"mqtts://localhost:{stack.cloud.tls_port}",
         "--username", "operator",
         "--password-file", str(stack.password_file("operator")),
         "--tls-ca", str(stack.ca)],
        env=_cli_env(),
        cwd=stack.root,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"edgewise {' '.join(args)}:\n{out}"
    assert "Traceback" not in out
    return out


def _events(observer: Client, node: str) -> list[tuple[str, str | None, str | None]]:
    """(kind, reason, ref) of the node's live update events seen at the cloud."""
    out = []
    for m in observer.messages[:]:
        if m.topic == f"sites/s1/edge/{node}/events" and not m.retain:
            e = decode_event(m.payload)
            out.append((e.kind, e.reason, e.ref))
    return out


def _statuses(observer: Client, node: str) -> list[str]:
    return [
        decode_status(m.payload).state
        for m in observer.messages[:]
        if m.topic == f"edge/{node}/status" and m.payload
    ]


def _results(observer: Client, node: str) -> Counter[tuple[str, int]]:
    """How many results the cloud got per (device, frame seq) from ``node``."""
    seen: Counter[tuple[str, int]] = Counter()
    for m in observer.messages[:]:
        if m.topic == f"sites/s1/edge/{node}/results":
            for r in decode_results(m.payload).results:
                seen[(r.device, r.frame_seq)] += 1
    return seen


def test_the_secured_compose_topology_runs_end_to_end(stack: Stack, tmp_path: Path) -> None:
    keys = stack.secrets / "fleet-keys"
    assert (keys / "root.pub").is_file(), "make-secrets.sh makes the fleet's keys"
    s = Services(tmp_path)
    site_watch = stack.observer("site", "watch-site")
    site_watch.subscribe("edge/+/status")
    cloud_watch = stack.observer("cloud", "watch-cloud")
    cloud_watch.subscribe("sites/s1/edge/#")
    cloud_watch.subscribe("edge/+/reply")
    site_port, cloud_port = stack.site.tls_port, stack.cloud.tls_port
    ca = {"EDGEWISE_SITE_BROKER__TLS_CA_FILE": str(stack.ca)}
    try:
        s.start("bridge", ["bridge", "--config", str(COMPOSE / "bridge/bridge.toml")], {
            **_broker_env("EDGEWISE_SITE_BROKER__", site_port, "bridge-s1",
                          stack.password_file("bridge-s1", "site")),
            **_broker_env("EDGEWISE_CLOUD_BROKER__", cloud_port, "bridge-s1",
                          stack.password_file("bridge-s1", "cloud")),
            **ca,
            "EDGEWISE_CLOUD_BROKER__TLS_CA_FILE": str(stack.ca),
            "EDGEWISE_QUEUE__DIR": str(tmp_path / "bridge-queues"),
        })  # fmt: skip
        for worker in WORKERS:
            s.start(worker, ["worker", "--config", str(COMPOSE / "worker/worker.toml")], {
                **_broker_env("EDGEWISE_WORKER_MQTT__", cloud_port, worker,
                              stack.password_file(worker)),
                "EDGEWISE_WORKER_MQTT__TLS_CA_FILE": str(stack.ca),
                "EDGEWISE_WORKER_WORKER_ID": worker,
                "EDGEWISE_WORKER_STORE__PATH": str(tmp_path / f"{worker}.db"),
            })  # fmt: skip
        for node in NODES:
            s.start(node, ["node", "--config", str(COMPOSE / "node/node.toml")], {
                **_broker_env("EDGEWISE_MQTT__", site_port, node, stack.password_file(node)),
                "EDGEWISE_MQTT__TLS_CA_FILE": str(stack.ca),
                **_broker_env("EDGEWISE_ESCALATION__UPLINK__", site_port, f"{node}-esc",
                              stack.password_file(f"{node}-esc")),
                "EDGEWISE_ESCALATION__UPLINK__TLS_CA_FILE": str(stack.ca),
                "EDGEWISE_NODE_ID": node,
                "EDGEWISE_STORAGE__STATE_DIR": str(tmp_path / node),
                "EDGEWISE_UPDATES__ROOT_KEY": str(keys / "root.pub"),
                "EDGEWISE_UPDATES__PROBATION_S": "1",
                "EDGEWISE_UPDATES__PROBATION_MIN_INFERENCES": "0",
                "EDGEWISE_TELEMETRY__WINDOW_S": "1",
            })  # fmt: skip
        for worker in WORKERS:
            s.wait_log(worker, "ready on")
        s.wait_log("bridge", "connected to")
        site_watch.wait(
            lambda: all("online" in _statuses(site_watch, n) for n in NODES),
            60,
            "both nodes online",
        )

        # Frames -> results at the cloud, unsure cases answered by the workers.
        for sensor in SENSORS:
            s.start(f"sensor-{sensor}", [
                "sensor", "simulate", "--broker", f"mqtt://127.0.0.1:{stack.site.plain_port}",
                "--device", sensor, "--count", str(FRAMES), "--rate", "50",
            ], {
                "EDGEWISE_MQTT__USERNAME": sensor,
                "EDGEWISE_MQTT__PASSWORD_FILE": str(stack.password_file(sensor)),
            })  # fmt: skip

        # The operator's key set and a signed release, published at the cloud over TLS.
        _operator(stack, ["keys", "publish-set", "--keys-dir", str(keys)])
        _operator(stack, [
            "model", "publish", str(REPO / "edgewise/assets/digits_edge.onnx"),
            "--name", "digits", "--release", "2", "--hw-class", "generic-cpu",
            "--keys-dir", str(keys),
        ])  # fmt: skip
        for sensor in SENSORS:
            assert s.procs[f"sensor-{sensor}"].wait(90) == 0, s.log(f"sensor-{sensor}")
        every_frame = {(d, i) for d in SENSORS for i in range(FRAMES)}
        for node in NODES:
            cloud_watch.wait(
                lambda n=node: set(_results(cloud_watch, n)) >= every_frame,
                90,
                f"every frame's result from {node} at the cloud",
            )
            cloud_watch.wait(
                lambda n=node: any(k == "committed" for k, _, _ in _events(cloud_watch, n)),
                90,
                f"{node} commits release 2",
            )

        # A command for gw-1 only, sent at the cloud: the bridge carries it down; it runs once.
        sent = _operator(stack, [
            "cmd", "send", "--node", "gw-1", "--edge-root", "sites/s1/edge",
            "--keys-dir", str(keys), "publish_telemetry",
        ])  # fmt: skip
        cloud_watch.wait(
            lambda: any(k == "command_done" for k, _, _ in _events(cloud_watch, "gw-1")),
            60,
            "gw-1 runs the command",
        )

        # Fleet status at the cloud shows both nodes.
        status = ["fleet", "status", "--edge-root", "sites/s1/edge", "--json", "--duration", "3"]
        report = json.loads(_operator(stack, status))
        running = {n: _statuses(site_watch, n) for n in NODES}  # before they are stopped
    finally:
        s.stop_all()
        site_watch.close()
        cloud_watch.close()

    for node in NODES:
        counts = _results(cloud_watch, node)
        assert set(counts) >= every_frame
        assert max(counts.values()) == 1, f"{node} answered a frame twice"
        kinds = [k for k, _, _ in _events(cloud_watch, node)]
        assert kinds.count("committed") == 1, kinds
        assert "rolled_back" not in kinds, kinds
    sources = Counter(
        r.source
        for m in cloud_watch.messages
        if m.topic.endswith("/results")
        for r in decode_results(m.payload).results
    )
    assert sources["cloud"] > 0, dict(sources)
    replies = [decode_replies(m.payload) for m in cloud_watch.messages if _is_reply(m)]
    assert {r.worker for r in replies} == set(WORKERS)
    done = [ref for k, _, ref in _events(cloud_watch, "gw-1") if k == "command_done"]
    assert len(done) == 1 and done[0] is not None and done[0][:8] in sent, (done, sent)
    assert not [k for k, _, _ in _events(cloud_watch, "gw-2") if k.startswith("command")]
    assert {n["node"] for n in report["nodes"]} >= set(NODES), report
    for node in NODES:
        states = running[node]
        first_online = states.index("online")
        assert "offline" not in states[first_online:], f"{node} flapped: {states}"
    for broker in (stack.site, stack.cloud):
        log = broker.log_text()
        assert log.count(TAKEOVER) == 0, f"{broker.role}: a client was taken over"
        assert log.count(REFUSED) == 0, f"{broker.role}: a client id was refused"
    for name in s.procs:
        assert "Traceback" not in s.log(name), s.log(name)


def _is_reply(m: Got) -> bool:
    return m.topic.startswith("edge/") and m.topic.endswith("/reply")
