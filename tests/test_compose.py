"""compose/docker-compose.yml checked against the code (Docker does not run here): every
service's ``edgewise`` command exists, every file it mounts is in the repo (or made by
compose/make-secrets.sh), every edgewise config it mounts loads with that service's settings
class, and every broker config includes the shared tuning."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from broker_bridge import BridgeConfig
from edgewise.cli import app

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
        words = " ".join(map(str, svc.get("command") or []))
        assert not re.search(r"pass|secret|token", words, re.I), service
        for key, value in (svc.get("environment") or {}).items():
            if "PASSWORD" in key:
                assert key.endswith("PASSWORD_FILE") and str(value).startswith("/run/secrets/")


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


def test_make_secrets_makes_every_secret_the_stack_mounts(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    if shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None:
        pytest.fail("make-secrets.sh needs openssl and mosquitto_passwd (apt-get install them)")
    copy = tmp_path / "compose"
    shutil.copytree(COMPOSE, copy, ignore=shutil.ignore_patterns("secrets"))
    subprocess.run([str(copy / "make-secrets.sh")], check=True, capture_output=True)
    wanted = [s for _, s, _ in mounts(compose) if s.startswith("./secrets/")]
    wanted += [v["file"] for v in compose["secrets"].values()]
    for source in wanted:
        assert (copy / source).exists(), f"make-secrets.sh does not make {source}"
    for svc in compose["services"].values():
        for name in svc.get("secrets", []):
            assert name in compose["secrets"]
    # The password files are what mosquitto reads: user:$7$... hashes, never a clear password.
    for side in ("site", "cloud"):
        for line in (copy / "secrets" / f"{side}.passwd").read_text().splitlines():
            user, hashed = line.split(":", 1)
            assert hashed.startswith("$7$"), user


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
    services = compose["services"]
    assert services["site-broker"]["image"] == "eclipse-mosquitto:2"
    assert services["cloud-broker"]["image"] == "eclipse-mosquitto:2"


def test_emqx_profile_swaps_the_cloud_broker(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["cloud-broker"]["profiles"] == ["mosquitto"]
    assert services["cloud-emqx"]["profiles"] == ["emqx"]
    assert services["cloud-emqx"]["image"].startswith("emqx/emqx:")
    for name in ("cloud-broker", "cloud-emqx"):
        assert services[name]["networks"]["default"]["aliases"] == ["cloud"]
    env = dict(
        line.split("=", 1)
        for line in (COMPOSE / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert env["COMPOSE_PROFILES"] == "mosquitto"
    # Every service that talks to the cloud broker uses the alias, whichever broker it is.
    assert BridgeConfig.model_validate(toml("bridge/bridge.toml")).cloud_broker.host == "cloud"
    assert toml("worker/worker.toml")["mqtt"]["host"] == "cloud"
    from cloud_worker import WorkerConfig

    worker = WorkerConfig.load(COMPOSE / "worker" / "worker.toml")
    assert (worker.mqtt.host, worker.mqtt.port) == ("cloud", 8883)
    # Mosquitto's cloud rights and EMQX's name the same principals.
    acl = (COMPOSE / "mosquitto" / "cloud" / "acl").read_text()
    emqx = (COMPOSE / "emqx" / "acl.conf").read_text()
    users = set(re.findall(r"^user (\S+)$", acl, re.M))
    assert users == {"bridge", "worker-1", "worker-2", "operator"}
    for user in ("bridge", "operator"):
        assert f'{{username, "{user}"}}' in emqx
    assert "^worker-[0-9]+$" in emqx and emqx.rstrip().endswith("{deny, all}.")


def toml(relative: str) -> dict[str, Any]:
    with (COMPOSE / relative).open("rb") as f:
        return tomllib.load(f)


def test_mounted_edgewise_configs_load(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("EDGEWISE_"):
            monkeypatch.delenv(name)
    bridge = BridgeConfig.model_validate(toml("bridge/bridge.toml"))
    assert bridge.site_broker.password_file == Path("/run/secrets/bridge_site_password")
    assert {r.direction for r in bridge.rules} == {"up", "down"}
    from edge_node.config import NodeConfig

    node = NodeConfig.model_validate(toml("node/node.toml"))
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
    from edgewise.credentials import _ENV as SENSOR_ENV

    readers: dict[tuple[str, ...], Any] = {
        ("node",): lambda n: _setting_read(NodeConfig, "EDGEWISE_", n),
        ("worker",): lambda n: _setting_read(WorkerConfig, WORKER_PREFIX, n),
        ("bridge",): lambda n: _setting_read(BridgeConfig, "EDGEWISE_", n),
        ("sensor", "simulate"): lambda n: n in SENSOR_ENV.values(),
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
    for line in (COMPOSE / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                if source in PENDING_SOURCES:
                    assert not (REPO / source).exists(), f"{source} exists now: unlist it"
                    continue
                assert (REPO / source).exists(), source
