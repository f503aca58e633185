"""The operator's commands on a secured broker, and what every command says when the broker is
not there: a real Mosquitto from the shipped site config (compose/mosquitto/site: passwords,
ACL, TLS with certificates made here), `edgewise` run as a process.

* Every command that connects takes --username, --password-file and --tls-ca (and the same
  from EDGEWISE_MQTT__*; a flag wins), and mqtts:// selects TLS.
* Ordinary trouble (nothing listening, a broker certificate from another CA or for another
  name, a wrong password, a subscription refused) ends every command with ONE line naming the
  broker and the reason, exit code 2, no traceback, nothing changed in the keys directory.
* `edgewise worker` started before its broker waits for it and becomes ready when it comes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgewise.local_broker import free_port
from edgewise.local_broker.probe import unique_client_id
from edgewise.releases import (
    Command,
    decode_document,
    decode_envelope,
    verify_key_set,
    verify_manifest,
)
from edgewise.releases.signing import load_public, raw_public
from schemas import Status, encode_status
from tests.bridgeharness import REPO, Client
from tests.conftest import SecureBrokerFactory
from tests.securebroker import Pki, SecureBroker, make_ca, make_pki
from tests.updatekit import CLOUD_MODEL, EDGE_MODEL, now
from tests.waiting import eventually_logged

USERS = ("operator", "gw-1", "cam-1")


@dataclass
class Secured:
    """The site broker, its CA, and a password file per user (plus a wrong one)."""

    broker: SecureBroker
    pki: Pki
    passwords: dict[str, str]
    secrets: Path
    rogue_ca: Path

    def password_file(self, user: str) -> Path:
        return self.secrets / f"{user}.password"

    @property
    def tls_url(self) -> str:
        return f"mqtts://localhost:{self.broker.tls_port}"  # the name on the certificate

    def flags(self, user: str = "operator") -> list[str]:
        """Everything a command needs to reach the broker over TLS as ``user``, by flags."""
        return ["--broker", self.tls_url, "--username", user,
                "--password-file", str(self.password_file(user)),
                "--tls-ca", str(self.pki.ca_cert)]  # fmt: skip

    def client(self, user: str) -> Client:
        """A paho client over TLS as ``user``, with a client id of its own inside the
        principal's namespace (``{user}:...``, as the broker's identity rule requires)."""
        c = Client(
            self.broker.tls, username=user, password=self.passwords[user],
            tls_ca=self.pki.ca_cert, client_id=unique_client_id(f"{user}:test"),
        )  # fmt: skip
        c.connect()
        return c


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("cli-secured")
    pki = make_pki(root / "pki")
    passwords = {u: secrets.token_urlsafe(12) for u in USERS}
    broker = SecureBroker("site", root / "site", passwords, pki)
    secret_dir = root / "secrets"
    secret_dir.mkdir()
    for user, password in {**passwords, "wrong": "not-the-password"}.items():
        path = secret_dir / f"{user}.password"
        path.write_text(password + "\n")
        path.chmod(0o600)
    _, _, rogue = make_ca(root, "rogue-ca")
    broker.start()
    try:
        yield Secured(broker, pki, passwords, secret_dir, rogue)
    finally:
        broker.stop()


def edgewise(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWISE_")}
    return subprocess.run(
        [sys.executable, "-m", "edgewise.cli.app", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=cwd or REPO,
        env={**clean, "COLUMNS": "200", **(env or {})},
    )


def one_line_error(done: subprocess.CompletedProcess[str], broker_url: str) -> str:
    """Exit code 2, one line on stderr naming the broker, no traceback anywhere."""
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output[-3000:]
    assert done.returncode == 2, output[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    (line,) = lines
    assert line.startswith("error: ") and broker_url in line, line
    return line


def no_secret_in(secured: Secured, *outputs: str) -> None:
    for text in outputs:
        for password in secured.passwords.values():
            assert password not in text


# -- point 5: the operator's commands over TLS, by flags ---------------------------------------


def test_operator_publishes_a_key_set_and_a_release_over_tls_with_flags(
    secured: Secured, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    assert edgewise("keys", "init", "--out-dir", str(keys)).returncode == 0
    root_public = raw_public(load_public((keys / "root.pub").read_bytes()))
    model = tmp_path / "digits.onnx"
    model.write_bytes(CLOUD_MODEL)
    node = secured.client("gw-1")  # a node reads fleet/# and models/#; it may write neither
    try:
        node.subscribe("fleet/keys")
        node.subscribe("fleet/generic-cpu/models/cli-tls")
        published = edgewise("keys", "publish-set", "-k", str(keys), *secured.flags())
        assert published.returncode == 0, published.stderr
        assert f"published key set v1 retained on fleet/keys at {secured.tls_url}" in (
            published.stdout
        )
        release = edgewise(
            "model", "publish", str(model), "--name", "cli-tls", "--release", "2",
            "--hw-class", "generic-cpu", "-k", str(keys), *secured.flags(),
        )  # fmt: skip
        assert release.returncode == 0, release.stderr
        assert f"at {secured.tls_url}" in release.stdout
        wanted = {"fleet/keys", "fleet/generic-cpu/models/cli-tls"}
        node.wait(lambda: {m.topic for m in node.snapshot()} >= wanted, 10, "key set, manifest")
        got = {m.topic: m.payload for m in node.snapshot()}
    finally:
        node.close()
    key_set = verify_key_set(
        got["fleet/keys"], root_public=root_public, held=None, now=now()
    ).key_set
    manifest = verify_manifest(
        got["fleet/generic-cpu/models/cli-tls"], keys=key_set, node_id="gw-1",
        hw_class="generic-cpu", floor=1, installed_sha256=None, now=now(),
    ).manifest  # fmt: skip
    assert (manifest.name, manifest.release) == ("cli-tls", 2)
    no_secret_in(secured, published.stdout, published.stderr, release.stdout, release.stderr)
    _clear(secured, ["fleet/keys", "fleet/generic-cpu/models/cli-tls"])


def _clear(secured: Secured, topics: list[str]) -> None:
    """Remove retained messages the operator's commands left (the operator is the one who
    may)."""
    op = Client(
        secured.broker.tls, username="operator", password=secured.passwords["operator"],
        tls_ca=secured.pki.ca_cert, client_id=unique_client_id("operator:clear"),
    )  # fmt: skip
    op.connect()
    try:
        for topic in topics:
            op.publish(topic, b"", retain=True)
    finally:
        op.close()


def test_cmd_send_over_tls_reaches_the_node(secured: Secured, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    edgewise("keys", "init", "--out-dir", str(keys))
    node = secured.client("gw-1")
    try:
        node.subscribe("edge/gw-1/cmd")
        sent = edgewise(
            "cmd", "send", "--node", "gw-1", "recycle_session", "-k", str(keys), *secured.flags()
        )
        assert sent.returncode == 0, sent.stderr
        assert secured.tls_url in sent.stdout
        node.wait_count(1, 10)
        (msg,) = node.snapshot()
    finally:
        node.close()
    assert decode_document(decode_envelope(msg.payload), Command).name == "recycle_session"


def test_fleet_status_and_watch_read_a_secured_broker_with_flags(secured: Secured) -> None:
    node = secured.client("gw-1")
    status = Status(node="gw-1", state="online", ts=time.time(), model="digits", release=3)
    try:
        node.publish("edge/gw-1/status", encode_status(status), retain=True)
        fleet = edgewise("fleet", "status", "-d", "1", "--json", *secured.flags())
        assert fleet.returncode == 0, fleet.stderr
        (row,) = [r for r in json.loads(fleet.stdout)["nodes"] if r["node"] == "gw-1"]
        assert (row["state"], row["model"], row["release"]) == ("online", "digits", 3)
        watched = edgewise(
            "watch", "edge/gw-1/status", "--count", "1", "-t", "20", *secured.flags()
        )
        assert watched.returncode == 0, watched.stderr
        assert "edge/gw-1/status" in watched.stdout and "retained" in watched.stdout
    finally:
        node.publish("edge/gw-1/status", b"", retain=True)
        node.close()
    no_secret_in(secured, fleet.stdout, fleet.stderr, watched.stdout, watched.stderr)


def test_credentials_come_from_the_environment_and_a_flag_wins_over_it(
    secured: Secured, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    edgewise("keys", "init", "--out-dir", str(keys))
    send = ["cmd", "send", "--node", "gw-1", "publish_telemetry", "-k", str(keys)]

    def env_of(user: str) -> dict[str, str]:
        return {
            "EDGEWISE_BROKER": secured.tls_url,
            "EDGEWISE_MQTT__USERNAME": user,
            "EDGEWISE_MQTT__PASSWORD_FILE": str(secured.password_file(user)),
            "EDGEWISE_MQTT__TLS_CA_FILE": str(secured.pki.ca_cert),
        }

    node = secured.client("gw-1")
    try:
        node.subscribe("edge/gw-1/cmd")
        from_env = edgewise(*send, env=env_of("operator"))
        assert from_env.returncode == 0, from_env.stderr
        node.wait_count(1, 10)
        # A sensor's account in the environment, the operator's by flags: the flags win.
        flags_win = edgewise(
            *send, "--username", "operator", "--password-file",
            str(secured.password_file("operator")), env=env_of("cam-1"),
        )  # fmt: skip
        assert flags_win.returncode == 0, flags_win.stderr
        node.wait_count(2, 10)
        # And the other way round: the sensor's account by flags may not command a node.
        refused = edgewise(
            *send, "--username", "cam-1", "--password-file", str(secured.password_file("cam-1")),
            env=env_of("operator"),
        )  # fmt: skip
        line = one_line_error(refused, secured.tls_url)
        assert "cannot publish to edge/gw-1/cmd" in line and "Not authorized" in line
        assert "'cam-1'" in line
    finally:
        node.close()
    assert node.count() == 2


def test_the_password_itself_is_never_a_flag() -> None:
    for command in (["watch"], ["fleet", "status"], ["keys", "publish-set"], ["cmd", "send"],
                    ["model", "publish"], ["sensor", "simulate"], ["demo"]):  # fmt: skip
        shown = edgewise(*command, "--help")
        assert shown.returncode == 0
        for option in ("--username", "--password-file", "--tls-ca", "mqtts://"):
            assert option in shown.stdout, (command, option)
        assert not re.search(r"--password(?!-file)", shown.stdout), command
    refused = edgewise("watch", "--password", "s3cret-pw")
    assert refused.returncode == 2 and "No such option" in refused.stderr


# -- point 6: one line and exit 2 for ordinary trouble ------------------------------------------


@pytest.fixture(scope="module")
def keys_with_history(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A keys directory with two releases of `digits` in its history (written with --out, so
    rollback has something to roll back to), the model file, and a release key id."""
    tmp = tmp_path_factory.mktemp("cli-history")
    keys = tmp / "keys"
    assert edgewise("keys", "init", "--out-dir", str(keys)).returncode == 0
    for release, data in ((2, EDGE_MODEL), (3, CLOUD_MODEL)):
        model = tmp / f"r{release}.onnx"
        model.write_bytes(data)
        done = edgewise(
            "model", "publish", str(model), "--name", "digits", "--release", str(release),
            "--hw-class", "generic-cpu", "-k", str(keys), "--out", str(tmp / f"out-{release}"),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    key_id = json.loads((keys / "keyring.json").read_text())["release_keys"][0]
    return keys, tmp / "r3.onnx", key_id


def _commands(keys: Path, model: Path, key_id: str) -> dict[str, list[str]]:
    k = ["-k", str(keys)]
    return {
        "keys publish-set": ["keys", "publish-set", *k],
        "keys rotate": ["keys", "rotate", *k],
        "keys revoke": ["keys", "revoke", key_id, *k],
        "model publish": ["model", "publish", str(model), "-n", "digits", "-r", "9",
                          "-c", "generic-cpu", *k],
        "model promote": ["model", "promote", "-n", "digits", "--rollout", "50", *k],
        "model rollback": ["model", "rollback", "-n", "digits", *k],
        "model status": ["model", "status"],
        "model gc": ["model", "gc", *k],
        "cmd send": ["cmd", "send", "--node", "gw-1", "recycle_session", *k],
        "fleet status": ["fleet", "status", "-d", "1"],
        "watch": ["watch", "--count", "1", "-t", "5"],
        "sensor simulate": ["sensor", "simulate", "--count", "1"],
        "demo": ["demo", "-d", "1"],
    }  # fmt: skip


COMMANDS = list(_commands(Path("k"), Path("m"), "id"))


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("trouble", ["nothing listening", "a CA that did not sign it",
                                     "a wrong password"])  # fmt: skip
def test_ordinary_trouble_is_one_line_and_exit_2(
    secured: Secured, keys_with_history: tuple[Path, Path, str], command: str, trouble: str
) -> None:
    keys, model, key_id = keys_with_history
    args = _commands(keys, model, key_id)[command]
    pw, ca = str(secured.password_file("operator")), str(secured.pki.ca_cert)
    if trouble == "nothing listening":
        url = f"mqtts://localhost:{free_port()}"
        where = ["--username", "operator", "--password-file", pw, "--tls-ca", ca]
        expected = "connection refused"
    elif trouble == "a CA that did not sign it":
        url = secured.tls_url
        where = ["--username", "operator", "--password-file", pw,
                 "--tls-ca", str(secured.rogue_ca)]  # fmt: skip
        expected = "certificate was not accepted"
    else:
        url = f"mqtt://127.0.0.1:{secured.broker.plain_port}"
        where = ["--username", "operator", "--password-file",
                 str(secured.password_file("wrong"))]  # fmt: skip
        expected = "not authorised"
    before = _snapshot(keys)
    line = one_line_error(edgewise(*args, "--broker", url, *where), url)
    assert expected in line, line
    assert _snapshot(keys) == before  # nothing signed, rotated or recorded


def test_a_broker_certificate_for_another_name_is_one_line(
    secured: Secured, tmp_path: Path, secure_broker: SecureBrokerFactory
) -> None:
    """The broker's certificate names `localhost` only: connecting to 127.0.0.1 must fail the
    host name check."""
    pki = make_pki(tmp_path / "pki", hosts=("localhost",))
    broker = secure_broker("site", tmp_path / "site", secured.passwords, pki)
    try:
        url = f"mqtts://127.0.0.1:{broker.tls_port}"
        done = edgewise("watch", "--count", "1", "-t", "5", "--broker", url, "--username",
                        "operator", "--password-file", str(secured.password_file("operator")),
                        "--tls-ca", str(pki.ca_cert))  # fmt: skip
    finally:
        broker.stop()
    line = one_line_error(done, url)
    assert "certificate was not accepted" in line and "mismatch" in line.lower(), line


def test_mqtts_checks_the_systems_cas_and_plain_mqtt_to_a_tls_port_says_so(
    secured: Secured,
) -> None:
    """mqtts:// alone is TLS against the system's CAs, which never signed the test broker's
    certificate; mqtt:// to the TLS port is not TLS, and the line suggests mqtts://."""
    login = ["--username", "operator", "--password-file", str(secured.password_file("operator"))]
    system_cas = edgewise("watch", "-n", "1", "-t", "5", "--broker", secured.tls_url, *login)
    line = one_line_error(system_cas, secured.tls_url)
    assert "certificate was not accepted" in line, line
    plain_url = f"mqtt://localhost:{secured.broker.tls_port}"
    plain = edgewise("watch", "-n", "1", "-t", "5", "--broker", plain_url, *login)
    assert "use mqtts://" in one_line_error(plain, plain_url)


def test_a_bad_password_file_or_ca_file_is_one_line_before_connecting(tmp_path: Path) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    missing = edgewise("watch", "--broker", url, "--username", "op", "--password-file",
                       str(tmp_path / "nope"))  # fmt: skip
    assert missing.returncode == 2 and "--password-file" in missing.stderr
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("not a certificate")
    bad_ca = edgewise("watch", "--broker", url, "--tls-ca", str(not_pem))
    assert bad_ca.returncode == 2 and "--tls-ca" in bad_ca.stderr
    lonely = tmp_path / "pw"
    lonely.write_text("s3cret-pw")
    no_user = edgewise("watch", "--broker", url, "--password-file", str(lonely))
    assert no_user.returncode == 2 and "needs --username" in no_user.stderr
    for done in (missing, bad_ca, no_user):
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr and "s3cret-pw" not in done.stderr


class _RefusingBroker:
    """amqtt (a real MQTT 3.1.1 broker, in a thread) whose topic ACL refuses any subscription
    outside `allowed/#`: Mosquitto's ACL file never refuses a SUBSCRIBE (it filters messages
    at delivery), so this is the broker that says no."""

    def __init__(self) -> None:
        self.port = free_port()
        self._ready = threading.Event()
        self._stop: object = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        import asyncio

        from amqtt.broker import Broker
        from amqtt.contexts import BrokerConfig, ListenerConfig, ListenerType

        async def main() -> None:
            config = BrokerConfig(
                listeners={"default": ListenerConfig(
                    type=ListenerType.TCP, bind=f"127.0.0.1:{self.port}")},
                plugins={
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
                    "amqtt.plugins.topic_checking.TopicAccessControlListPlugin": {
                        "acl": {"anonymous": ["allowed/#"]}
                    },
                },
            )  # fmt: skip
            broker = Broker(config)
            await broker.start()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            self._stop = lambda: loop.call_soon_threadsafe(stop.set)
            self._ready.set()
            await stop.wait()
            await broker.shutdown()

        asyncio.run(main())

    def __enter__(self) -> _RefusingBroker:
        from edgewise.local_broker import quiet_amqtt_logging

        quiet_amqtt_logging()
        self._thread.start()
        assert self._ready.wait(10), "amqtt did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if callable(self._stop):
            self._stop()
        self._thread.join(10)


@pytest.mark.filterwarnings("ignore:The 'acl' option is deprecated:DeprecationWarning")
def test_a_refused_subscription_is_one_line_and_exit_2() -> None:
    """watch, fleet status and model status subscribe (the latter two as every command that
    reads retained state does); run at once, as amqtt makes each first wait out an MQTT 5
    CONNECT it does not answer before the MQTT 3.1.1 one."""
    with _RefusingBroker() as broker:
        url = f"mqtt://127.0.0.1:{broker.port}"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWISE_")}
        runs = {
            name: subprocess.Popen(
                [sys.executable, "-m", "edgewise.cli.app", *args, "--broker", url],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                env={**clean, "COLUMNS": "200"},
            )
            for name, args in {
                "watch": ["watch", "edge/#", "-n", "1", "-t", "30"],
                "fleet status": ["fleet", "status", "-d", "1"],
                "model status": ["model", "status", "--settle-s", "0.5"],
            }.items()
        }  # fmt: skip
        done = {}
        for name, proc in runs.items():
            out, err = proc.communicate(timeout=90)
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    for name, result in done.items():
        line = one_line_error(result, url)
        assert "refused the subscription" in line, (name, line)


# -- point 6: a service started before its broker ------------------------------------------------


def test_worker_started_before_its_broker_becomes_ready_when_the_broker_comes(
    tmp_path: Path, secure_broker: SecureBrokerFactory
) -> None:
    """Under systemd or compose a worker may start first: it must wait (saying why) and serve
    once its broker is up, over TLS with its own account, as compose runs it."""
    passwords = {"worker-1": secrets.token_urlsafe(12), "operator": "x"}
    pki = make_pki(tmp_path / "pki")
    broker = secure_broker("cloud", tmp_path / "cloud", passwords, pki, start=False)  # ports chosen
    secret = tmp_path / "worker-1.password"
    secret.write_text(passwords["worker-1"])
    log = tmp_path / "worker.log"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWISE_")}
    env = {
        **clean,
        "EDGEWISE_WORKER_WORKER_ID": "worker-1",
        "EDGEWISE_WORKER_STORE__PATH": str(tmp_path / "hard.db"),
        "EDGEWISE_WORKER_MQTT__RECONNECT_FIRST_S": "0.2",
        "EDGEWISE_WORKER_MQTT__RECONNECT_CAP_S": "1",
    }
    args = ["worker", "--broker", f"mqtts://localhost:{broker.tls_port}", "--username",
            "worker-1", "--password-file", str(secret), "--tls-ca", str(pki.ca_cert)]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgewise.cli.app", *args],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env={**env, "COLUMNS": "200"},
        )  # fmt: skip

    def wait_log(text: str, timeout_s: float = 60) -> None:
        eventually_logged(
            text, lambda: log.read_text(errors="replace"), proc, "worker", timeout_s=timeout_s
        )

    try:
        wait_log("Connection refused")  # it tried, and says why
        wait_log("retrying in")
        assert "ready on" not in log.read_text()
        broker.start()
        wait_log("ready on")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        broker.stop()
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    assert passwords["worker-1"] not in text


def test_worker_stopped_while_waiting_for_its_broker_exits_cleanly(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWISE_")}
    env = {**clean, "EDGEWISE_WORKER_STORE__PATH": str(tmp_path / "hard.db"), "COLUMNS": "200"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgewise.cli.app", "worker", "--broker",
             f"mqtt://127.0.0.1:{free_port()}"],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env,
        )  # fmt: skip
    try:
        eventually_logged("cannot connect", lambda: log.read_text(errors="replace"), proc, "worker")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert "stopped before the broker answered" in text and "Traceback" not in text
