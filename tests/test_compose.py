"""compose/docker-compose.yml checked against the code (Docker does not run here): every
service's ``edgewise`` command exists, every file it mounts is in the repo (or made by
compose/make-secrets.sh), every edgewise config it mounts loads with that service's settings
class, and every broker config includes the shared tuning."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel
from typer.testing import CliRunner

from broker_bridge import BridgeConfig
from edgewise.cli.app import app
from edgewise.releases.signing import public_pem
from tests.bridgeharness import Client
from tests.conftest import SecureBrokerFactory
from tests.securebroker import mounted_secrets

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose"

#: Subcommands the compose file runs that are written on another branch, with why. When one
#: lands, this test fails until it is taken off the list, so the list cannot go stale.
PENDING: dict[tuple[str, ...], str] = {}
#: Paths the Dockerfile copies that another branch adds.
PENDING_SOURCES: set[str] = set()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def edgewise_commands(compose: dict[str, Any]) -> dict[str, list[str]]:
    out = {}
    for name, svc in compose["services"].items():
        cmd = svc.get("command")
        if isinstance(cmd, list) and cmd and cmd[0] == "edgewise":
            out[name] = cmd
    return out


def subcommand_path(cmd: list[str]) -> tuple[str, ...]:
    """The subcommand words of ``edgewise a b --opt ...``: up to the first option."""
    words: list[str] = []
    for word in cmd[1:]:
        if word.startswith("-"):
            break
        words.append(word)
    return tuple(words)


def registered(path: tuple[str, ...]) -> bool:
    """Whether ``edgewise <path>`` is a command the typer app has registered."""
    command: Any = typer.main.get_command(app)
    for word in path:
        commands = getattr(command, "commands", None)
        if not isinstance(commands, dict) or word not in commands:
            return False
        command = commands[word]
    return True


def test_every_service_command_exists_in_the_cli(compose: dict[str, Any]) -> None:
    commands = edgewise_commands(compose)
    assert {"bridge", "node-1", "node-2", "worker-1", "worker-2", "sensor-cam-1"} <= set(commands)
    runner = CliRunner()
    for service, cmd in commands.items():
        path = subcommand_path(cmd)
        if path in PENDING:
            assert not registered(path), f"`edgewise {' '.join(path)}` exists now: unlist it"
            continue
        assert registered(path), f"{service}: `edgewise {' '.join(path)}` is not a command"
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (service, result.output)
        # Every option the service passes is one the command knows.
        for word in cmd[1 + len(path) :]:
            if word.startswith("--"):
                assert word in result.output, f"{service}: {' '.join(path)} has no {word}"


def test_no_credentials_on_any_command_line_or_in_environment_values(
    compose: dict[str, Any],
) -> None:
    for service, svc in compose["services"].items():
        words = " ".join(map(str, (svc.get("entrypoint") or []) + (svc.get("command") or [])))
        assert not re.search(r"pass|secret|token|cookie", words, re.I), service
        for key, value in (svc.get("environment") or {}).items():
            if "PASSWORD" in key:
                # ..._PASSWORD_FILE (edgewise), ..._PASSWORD__FILE (Grafana's file convention)
                assert key.endswith(("PASSWORD_FILE", "PASSWORD__FILE")), (service, key)
                assert str(value).startswith("/run/secrets/"), (service, key)
            assert "COOKIE" not in key, (service, key)


def mounts(compose: dict[str, Any]) -> list[tuple[str, str, str]]:
    out = []
    for service, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            source, target = vol.split(":")[:2]
            if source.startswith("."):
                out.append((service, source, target))
    return out


def test_every_mounted_config_is_in_the_repo(compose: dict[str, Any]) -> None:
    found = mounts(compose)
    assert found
    for service, source, _ in found:
        if source.startswith("./secrets/"):
            continue  # made by make-secrets.sh: see the next test
        path = (COMPOSE / source).resolve()
        assert path.exists(), f"{service} mounts {source}, which is not in the repo"
        assert REPO in path.parents


MAKE_SECRETS = COMPOSE / "make-secrets.sh"


def make_secrets(
    out: Path, *args: str, sudo_uid: int | None = None
) -> subprocess.CompletedProcess[str]:
    if shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None:
        pytest.fail("make-secrets.sh needs openssl and mosquitto_passwd (apt-get install them)")
    env = {k: v for k, v in os.environ.items() if k != "SUDO_UID"}
    # The fleet's update keys are made by the project's own `edgewise keys init`.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    if sudo_uid is not None:
        env["SUDO_UID"] = str(sudo_uid)
    return subprocess.run(
        [str(MAKE_SECRETS), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def dotenv() -> dict[str, str]:
    return dict(
        line.split("=", 1)
        for line in (COMPOSE / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )


def image_uids(compose: dict[str, Any]) -> dict[str, int]:
    """The uid each service's processes run as: the edgewise image's from its Dockerfile's
    ``useradd --uid``, the broker images' from compose/.env (MOSQUITTO_UID is checked against
    the image when compose/mosquitto/Dockerfile builds; EMQX_UID is emqx/emqx:5.8's user)."""
    m = re.search(r"useradd\b[^\n]*--uid (\d+)", (COMPOSE / "Dockerfile").read_text())
    assert m is not None, "compose/Dockerfile: no useradd --uid"
    env = dotenv()
    uids = {}
    for name, svc in compose["services"].items():
        build = svc.get("build") or {}
        if build.get("dockerfile") == "compose/Dockerfile":
            uids[name] = int(m.group(1))
        elif build.get("context") == "./mosquitto":
            uids[name] = int(env["MOSQUITTO_UID"])
        elif str(svc.get("image", "")).startswith("emqx/emqx:"):
            uids[name] = int(env["EMQX_UID"])
        elif str(svc.get("image", "")).startswith("prom/prometheus:"):
            uids[name] = int(env["PROMETHEUS_UID"])
        elif str(svc.get("image", "")).startswith("grafana/grafana-oss:"):
            uids[name] = int(env["GRAFANA_UID"])
    assert set(uids) == set(compose["services"]), set(compose["services"]) - set(uids)
    return uids


def readers(compose: dict[str, Any], operator_uid: int = 0) -> dict[str, set[int]]:
    """Each file under secrets/ the stack mounts (relative to secrets/), with the uids that read
    it (bind mounts and file-based Docker secrets alike keep the host file's owner and mode);
    and operator_password, which the operator's commands read on the host."""
    uids = image_uids(compose)
    out: dict[str, set[int]] = {"operator_password": {operator_uid}}
    for service, source, _ in mounts(compose):
        if source.startswith("./secrets/"):
            out.setdefault(source.removeprefix("./secrets/"), set()).add(uids[service])
    for service, svc in compose["services"].items():
        for name in svc.get("secrets", []):
            file = compose["secrets"][name]["file"].removeprefix("./secrets/")
            out.setdefault(file, set()).add(uids[service])
    return out


PUBLIC = {"certs/ca.crt", "certs/server.crt"}


def public(rel: str) -> bool:
    """Certificates and public keys (the fleet's root.pub is mounted into the nodes): 0644."""
    return rel in PUBLIC or (rel.startswith("fleet-keys/") and rel.endswith(".pub"))


def operators(rel: str) -> bool:
    """The fleet's private signing keys and key ring: the operator's, on the host, never
    mounted; 0600 as `edgewise keys init` writes them (the ring's version grows in place)."""
    return rel.startswith("fleet-keys/") and not rel.endswith(".pub")


def test_make_secrets_makes_every_secret_the_stack_mounts(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    made = make_secrets(tmp_path / "s", "--local")
    assert made.returncode == 0, made.stderr
    for source in readers(compose):
        assert (tmp_path / "s" / source).exists(), f"make-secrets.sh does not make {source}"
    for svc in compose["services"].values():
        for name in svc.get("secrets", []):
            assert name in compose["secrets"]
    # The password files are what mosquitto reads: user:$7$... hashes, never a clear password.
    for side in ("site", "cloud"):
        for line in (tmp_path / "s" / f"{side}.passwd").read_text().splitlines():
            user, hashed = line.split(":", 1)
            assert hashed.startswith("$7$"), user


def test_each_secret_is_readable_by_exactly_the_container_user_that_reads_it(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """make-secrets.sh (run as root, as it must be) gives every secret to the uid of the one
    image that mounts it, mode 0400; the certificates are public; what no container mounts (the
    CA's key, the master server key) stays root's. Files no rule covers fail the test."""
    out = tmp_path / "s"
    if os.geteuid() != 0:  # only root can give files away: the script must say so and stop
        refused = make_secrets(out)
        assert refused.returncode == 2 and "sudo" in refused.stderr, refused.stderr
        assert not out.exists() or not any(out.iterdir())
        pytest.fail("run this test as root: it checks the files' owners (dev.sh runs as root)")
    made = make_secrets(out, sudo_uid=4242)  # as `sudo` by uid 4242
    assert made.returncode == 0, made.stderr
    want = readers(compose, operator_uid=4242)
    for source, uids in want.items():
        if not public(source):
            assert len(uids) == 1, f"{source} is read by several users: {uids}"
    seen = set()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        st = path.stat()
        mode = stat.S_IMODE(st.st_mode)
        seen.add(rel)
        if public(rel):
            assert mode == 0o644, (rel, oct(mode))
        elif operators(rel):
            assert (st.st_uid, mode) == (4242, 0o600), (rel, st.st_uid, oct(mode))
        elif rel in want:
            (uid,) = want[rel]
            assert (st.st_uid, st.st_gid, mode) == (uid, uid, 0o400), (rel, st.st_uid, oct(mode))
        else:
            assert rel in {"certs/ca.key", "certs/server.key", "certs/ca.srl"}, f"unexpected {rel}"
            assert (st.st_uid, mode) == (0, 0o400), (rel, st.st_uid, oct(mode))
    assert set(want) <= seen
    assert (out / "fleet-keys" / "root.pub").is_file()
    assert (out / "fleet-keys").stat().st_uid == 4242
    for d in (out, out / "certs", out / "fleet-keys"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    # Re-running keeps the passwords (and the rules above: checked again below).
    before = {p: (out / p).read_bytes() for p in want if p.endswith("_password")}
    assert make_secrets(out, sudo_uid=4242).returncode == 0
    assert {p: (out / p).read_bytes() for p in before} == before


@pytest.mark.parametrize("role", ["site", "cloud"])
def test_mosquitto_as_its_image_user_reads_its_secrets_and_another_user_cannot(
    compose: dict[str, Any], tmp_path: Path, role: str, secure_broker: SecureBrokerFactory
) -> None:
    """The broker's config, with the files make-secrets.sh made mounted as compose mounts them
    (owner and mode kept), run as the uid of eclipse-mosquitto:2's user: it reads its password
    file and its TLS key (Mosquitto 2.0.11 reads both after dropping root) and a principal logs
    in over TLS. Run as the edgewise image's uid instead, it cannot start."""
    if os.geteuid() != 0:
        pytest.fail("run this test as root: it runs Mosquitto as other users (dev.sh runs as root)")
    out = tmp_path / "s"
    made = make_secrets(out)
    assert made.returncode == 0, made.stderr
    service = "site-broker" if role == "site" else "cloud-broker"
    mounted = {
        (source.removeprefix("./secrets/"), target)
        for svc, source, target in mounts(compose)
        if svc == service and source.startswith("./secrets/")
    }
    assert mounted == {(f, f"/mosquitto/{m}") for f, m in mounted_secrets(role)}
    uids = image_uids(compose)
    user = "gw-1" if role == "site" else "worker-1"
    view = Path(tempfile.mkdtemp(prefix="edgewise-mounts-"))  # a path other users can traverse
    try:
        view.chmod(0o755)
        broker = secure_broker(role, view / "ok", secrets=out, run_as_uid=uids[service])
        try:
            client = Client(
                broker.tls,
                client_id=f"{user}:check",
                username=user,
                password=(out / f"{user}_password").read_text().strip(),
                tls_ca=out / "certs" / "ca.crt",
            )
            client.connect()
            client.close()
        finally:
            broker.stop()
        other = secure_broker(
            role, view / "other", secrets=out, run_as_uid=uids["node-1"], start=False
        )
        with pytest.raises(RuntimeError, match=r"Permission denied|Unable to open"):
            other.start()
        other.stop()
    finally:
        shutil.rmtree(view)


def test_make_secrets_for_local_processes_keeps_every_file_to_its_caller(tmp_path: Path) -> None:
    """--local: for services run as processes by the caller (the tests): every secret the
    caller's, mode 0400, whoever the caller is."""
    out = tmp_path / "s"
    made = make_secrets(out, "--local")
    assert made.returncode == 0, made.stderr
    for path in (p for p in out.rglob("*") if p.is_file()):
        st = path.stat()
        rel = path.relative_to(out).as_posix()
        want = 0o644 if public(rel) else 0o600 if operators(rel) else 0o400
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), want), path


def test_make_secrets_refuses_to_leave_files_containers_cannot_read(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """Not root and not --local: it says what to run, writes nothing, exits 2."""
    if os.geteuid() == 0:
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        # The script and what it reads, where another user can reach them (a checkout may lie
        # in a directory only root can enter).
        reach = Path(tempfile.mkdtemp(prefix="edgewise-nobody-"))
        reach.chmod(0o777)
        copy = reach / "compose"
        copy.mkdir()
        for name in ("make-secrets.sh", "Dockerfile", ".env"):
            shutil.copy2(COMPOSE / name, copy / name)
        copy.chmod(0o755)
        script = copy / "make-secrets.sh"
        out = reach / "s"
        try:
            done = subprocess.run(
                [*nobody, str(script), "--out", str(out)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            wrote = out.exists()
        finally:
            shutil.rmtree(reach)
    else:
        script = MAKE_SECRETS
        out = tmp_path / "s"
        done = make_secrets(out)
        wrote = out.exists()
    assert done.returncode == 2, done.stderr
    assert f"sudo {script} --out {out}" in done.stderr and "--local" in done.stderr
    containers = {uid for name, uids in readers(compose).items() if name != "operator_password"
                  for uid in uids}  # fmt: skip
    assert len(containers) >= 4
    for uid in containers:  # every uid a container reads its secrets as
        assert f"uid {uid} " in done.stderr, uid
    assert not wrote


def test_every_broker_config_includes_the_shared_tuning(compose: dict[str, Any]) -> None:
    for service, source, target in mounts(compose):
        if target == "/mosquitto/config/mosquitto.conf":
            text = (COMPOSE / source).read_text()
            assert "include_dir /mosquitto/config/conf.d" in text, source
            assert "allow_anonymous false" in text, source
            conf_d = [s for svc, s, t in mounts(compose) if svc == service and t.endswith("conf.d")]
            assert conf_d == ["./mosquitto/conf.d"], service
    assert (
        (COMPOSE / "mosquitto" / "conf.d" / "tuning.conf").read_text().count("max_queued_messages")
    )


def test_both_mosquitto_brokers_are_eclipse_mosquitto_2(compose: dict[str, Any]) -> None:
    """...with the edgewise_clientid plugin, built in compose/mosquitto/Dockerfile where the
    configs load it from, and the image's uid checked against compose/.env's MOSQUITTO_UID."""
    services = compose["services"]
    for name in ("site-broker", "cloud-broker"):
        assert services[name]["build"] == {
            "context": "./mosquitto",
            "args": {"MOSQUITTO_UID": "${MOSQUITTO_UID}"},
        }
        assert services[name]["image"] == "edgewise-mosquitto:local"
    dockerfile = (COMPOSE / "mosquitto" / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == ["eclipse-mosquitto:2"] * 2
    assert "sh /src/plugin/build.sh /out" in dockerfile
    assert 'test "$(id -u mosquitto)" = "$MOSQUITTO_UID"' in dockerfile
    m = re.search(r"^COPY --from=build /out/edgewise_clientid.so (\S+)$", dockerfile, re.M)
    assert m is not None
    for side in ("site", "cloud"):
        conf = (COMPOSE / "mosquitto" / side / "mosquitto.conf").read_text()
        assert re.findall(r"^plugin (\S+)$", conf, re.M) == [m.group(1)], side
        assert "use_username_as_clientid" not in conf.replace("# ", ""), side


def test_emqx_profile_swaps_the_cloud_broker(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["cloud-broker"]["profiles"] == ["mosquitto"]
    assert services["cloud-emqx"]["profiles"] == ["emqx"]
    assert services["cloud-emqx"]["image"].startswith("emqx/emqx:")
    for name in ("cloud-broker", "cloud-emqx"):
        assert services[name]["networks"]["default"]["aliases"] == ["cloud"]
    assert dotenv()["COMPOSE_PROFILES"] == "mosquitto"
    # Every service that talks to the cloud broker uses the alias, whichever broker it is.
    assert BridgeConfig.model_validate(toml("bridge/bridge.toml")).cloud_broker.host == "cloud"
    assert toml("worker/worker.toml")["mqtt"]["host"] == "cloud"
    from cloud_worker import WorkerConfig

    worker = WorkerConfig.load(COMPOSE / "worker" / "worker.toml")
    assert (worker.mqtt.host, worker.mqtt.port) == ("cloud", 8883)
    # (The principals and rights of both cloud brokers: tests/test_emqx_acl.py.)


def test_emqx_dashboard_and_cluster_cookie_are_not_the_defaults(compose: dict[str, Any]) -> None:
    """The dashboard is published on loopback only unless EMQX_DASHBOARD_BIND says otherwise,
    its first password and the cluster cookie come from secrets make-secrets.sh makes (handed
    to EMQX by emqx/entrypoint.sh, in no command line or environment value of the spec)."""
    emqx = compose["services"]["cloud-emqx"]
    dashboard = [p for p in emqx["ports"] if str(p).endswith(":18083")]
    assert dashboard == ["${EMQX_DASHBOARD_BIND:-127.0.0.1}:18083:18083"]
    assert dotenv()["EMQX_DASHBOARD_BIND"] == "127.0.0.1"
    assert sorted(emqx["secrets"]) == ["emqx_cookie", "emqx_dashboard_password"]
    assert emqx["entrypoint"] == ["/bin/sh", "/opt/edgewise/entrypoint.sh"]
    assert ("cloud-emqx", "./emqx/entrypoint.sh", "/opt/edgewise/entrypoint.sh") in mounts(compose)
    script = (COMPOSE / "emqx" / "entrypoint.sh").read_text()
    for secret, variable in (
        ("emqx_dashboard_password", "EMQX_DASHBOARD__DEFAULT_PASSWORD"),
        ("emqx_cookie", "EMQX_NODE__COOKIE"),
    ):
        assert f"{variable}=$(cat /run/secrets/{secret})" in script
        assert "export EMQX_DASHBOARD__DEFAULT_PASSWORD EMQX_NODE__COOKIE" in script
        assert variable not in (emqx.get("environment") or {})
    assert script.rstrip().endswith('exec /usr/bin/docker-entrypoint.sh "$@"')
    assert emqx["command"] == ["/opt/emqx/bin/emqx", "foreground"]  # the image's own CMD


def toml(relative: str) -> dict[str, Any]:
    with (COMPOSE / relative).open("rb") as f:
        return tomllib.load(f)


def test_mounted_edgewise_configs_load(
    compose: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("EDGEWISE_"):
            monkeypatch.delenv(name)
    bridge = BridgeConfig.model_validate(toml("bridge/bridge.toml"))
    assert bridge.site_broker.password_file == Path("/run/secrets/bridge_site_password")
    assert {r.direction for r in bridge.rules} == {"up", "down"}
    from edge_node.config import NodeConfig

    node_toml = toml("node/node.toml")
    # Enrolled for updates with the root key compose mounts from make-secrets.sh's fleet-keys/.
    assert node_toml["updates"]["root_key"] == "/etc/edgewise/root.pub"
    assert ("node-1", "./secrets/fleet-keys/root.pub", "/etc/edgewise/root.pub") in mounts(compose)
    root_pub = tmp_path / "root.pub"
    root_pub.write_bytes(public_pem(Ed25519PrivateKey.generate()))
    node_toml["updates"]["root_key"] = str(root_pub)
    node = NodeConfig.model_validate(node_toml)
    assert node.updates.root_key_bytes() is not None
    assert node.mqtt.host == "site-broker"
    assert node.mqtt.tls_ca_file == Path("/etc/edgewise/ca.crt")


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _setting_read(cls: type[BaseModel], prefix: str, name: str) -> bool:
    """Whether settings class ``cls`` (environment prefix ``prefix``, ``__`` between levels)
    reads the variable ``name``."""
    if not name.startswith(prefix):
        return False
    model: type[BaseModel] | None = cls
    for part in name[len(prefix) :].lower().split("__"):
        if model is None or part not in model.model_fields:
            return False
        model = _model_of(model.model_fields[part].annotation)
    return True


def test_every_environment_variable_a_service_sets_is_a_setting_it_reads(
    compose: dict[str, Any],
) -> None:
    """A misspelt variable is silently ignored by the service (EDGEWISE_WORKER_ID once left both
    workers named after their container), so each one must name a setting of the command."""
    from cloud_worker.config import ENV_PREFIX as WORKER_PREFIX
    from cloud_worker.config import WorkerConfig
    from edge_node.config import NodeConfig
    from edgewise.cli.credentials import _ENV as SENSOR_ENV

    readers: dict[tuple[str, ...], Any] = {
        ("node",): lambda n: _setting_read(NodeConfig, "EDGEWISE_", n),
        ("worker",): lambda n: _setting_read(WorkerConfig, WORKER_PREFIX, n),
        ("bridge",): lambda n: _setting_read(BridgeConfig, "EDGEWISE_", n),
        ("sensor", "simulate"): lambda n: n in SENSOR_ENV.values(),
        ("fleet", "exporter"): lambda n: n in SENSOR_ENV.values(),
    }
    checked = 0
    for service, cmd in edgewise_commands(compose).items():
        svc = compose["services"][service]
        for name, value in (svc.get("environment") or {}).items():
            assert readers[subcommand_path(cmd)](name), f"{service}: nothing reads {name}"
            checked += 1
            if str(value).startswith("/run/secrets/"):
                secret = str(value).removeprefix("/run/secrets/")
                assert secret in svc.get("secrets", []), f"{service}: {secret} is not mounted"
    assert checked >= 14


def test_dockerfile_copies_what_exists() -> None:
    for dockerfile, context in (
        (COMPOSE / "Dockerfile", REPO),
        (COMPOSE / "mosquitto" / "Dockerfile", COMPOSE / "mosquitto"),
    ):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                for source in line.split()[1:-1]:
                    if source in PENDING_SOURCES:
                        assert not (context / source).exists(), f"{source} exists now: unlist it"
                        continue
                    assert (context / source).exists(), (dockerfile, source)
