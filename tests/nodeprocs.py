"""The edge node as a real process (``edgewise node``), and what its consumer saw."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from edgewise.local_broker import BrokerInfo, Message, MqttProbe
from edgewise.releases import decode_event
from schemas import decode_results, decode_status


def spawn_node(settings: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``edgewise node`` configured by ``settings`` (``EDGEWISE_*`` variables: none is taken
    from this process's environment), its output in ``log_path``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWISE_")}
    env.update(settings)
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "edgewise.cli.app", "node"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def kill_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL every process still running, and reap it."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


class NodeProcesses:
    """Start ``edgewise node`` processes that share one node id and one state directory."""

    def __init__(
        self,
        broker: BrokerInfo,
        state_dir: Path,
        node_id: str,
        *,
        max_batch_size: int = 64,
        env: dict[str, str] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.extra_env = dict(env or {})
        self.broker = broker
        self.state_dir = state_dir
        self.node_id = node_id
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        settings = {
            "EDGEWISE_NODE_ID": self.node_id,
            "EDGEWISE_MQTT__HOST": self.broker.host,
            "EDGEWISE_MQTT__PORT": str(self.broker.port),
            "EDGEWISE_MQTT__RECONNECT_FIRST_S": "0.1",
            "EDGEWISE_MQTT__RECONNECT_CAP_S": "0.5",
            "EDGEWISE_STORAGE__STATE_DIR": str(self.state_dir),
            "EDGEWISE_LOG_LEVEL": "INFO",
            "EDGEWISE_BATCHING__MAX_BATCH_SIZE": str(self.max_batch_size),
            **self.extra_env,
        }
        proc = spawn_node(settings, self.state_dir / f"node-{len(self.procs)}.log")
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        kill_all(self.procs)


def start_watched(nodes: NodeProcesses, mqtt_probe: Callable[..., MqttProbe]) -> MqttProbe:
    """Start a node process with a consumer of all it publishes (a persistent session made by
    the ``mqtt_probe`` fixture's factory) that has seen it come online; return the consumer."""
    consumer = mqtt_probe(nodes.broker, f"consumer-{nodes.node_id}", clean_session=False)
    consumer.subscribe(f"edge/{nodes.node_id}/#")
    nodes.start()
    consumer.wait_for(online, 20)
    return consumer


class ResultLedger:
    """Which result ids the consumer saw for each frame seq, fed from a probe's messages.

    A probe's ``wait_for`` runs its predicate over every message received so far each time one
    arrives; decoding each message once keeps that linear.
    """

    def __init__(self) -> None:
        self.ids: dict[int, set[str]] = defaultdict(set)
        self.node_seqs: set[int] = set()
        self._fed: set[int] = set()

    def feed(self, m: Message) -> None:
        if id(m) in self._fed or not m.topic.endswith("/results"):
            return
        self._fed.add(id(m))
        for r in decode_results(m.payload).results:
            self.ids[r.frame_seq].add(r.id)
            self.node_seqs.add(r.seq)


def frames_answered(db: Path) -> int:
    """Frames the node has answered (durably), read from its outbox like any SQLite reader;
    0 before the table exists."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM answered").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def online(m: Message) -> bool:
    return m.topic.endswith("/status") and decode_status(m.payload).state == "online"


def event_kind(m: Message) -> str:
    """An update event's kind, with its reason when it has one (``"rejected:signature"``)."""
    e = decode_event(m.payload)
    return e.kind if e.reason is None else f"{e.kind}:{e.reason}"


def is_event(kind: str) -> Callable[[Message], bool]:
    """A live (not retained) update event of that :func:`event_kind`."""
    return lambda m: m.topic.endswith("/events") and not m.retain and event_kind(m) == kind


class EnrolledNodes:
    """Start ``edgewise node`` processes enrolled for updates: on ``broker``, trusting the root
    key given to :meth:`start`, under the given fleet and models topic roots, their state in
    ``tmp_path / "state"`` and each one's output in a log file of its own in ``tmp_path``."""

    def __init__(self, broker: BrokerInfo, tmp_path: Path, fleet_root: str, models_root: str):
        self.broker = broker
        self.tmp_path = tmp_path
        self.roots = {"fleet": fleet_root, "models": models_root}
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, node_id: str, root_pub: Path, *, log_name: str | None = None, **extra: str
    ) -> subprocess.Popen[bytes]:
        """``extra``: more environment variables; the log is ``log_name`` (default
        ``<node_id>-<n>.log``, n counting the processes started)."""
        settings = {
            "EDGEWISE_NODE_ID": node_id,
            "EDGEWISE_HARDWARE_CLASS": "generic-cpu",
            "EDGEWISE_MQTT__HOST": self.broker.host,
            "EDGEWISE_MQTT__PORT": str(self.broker.port),
            "EDGEWISE_STORAGE__STATE_DIR": str(self.tmp_path / "state"),
            "EDGEWISE_TOPICS__FLEET_ROOT": self.roots["fleet"],
            "EDGEWISE_TOPICS__MODELS_ROOT": self.roots["models"],
            "EDGEWISE_UPDATES__ROOT_KEY": str(root_pub),
            **extra,
        }
        name = log_name or f"{node_id}-{len(self.procs)}.log"
        p = spawn_node(settings, self.tmp_path / name)
        self.procs.append(p)
        return p

    def kill_all(self) -> None:
        kill_all(self.procs)
