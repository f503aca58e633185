"""Publishing guards of `edgewise model publish` and `edgewise keys`, against a real broker:
the mistakes an operator makes (an old release number, a mistyped hardware class, a stale copy
of the keys directory) are refused before anything is signed or published, and what the broker
holds stays as it was; --force goes through and says so. Commands that read retained state
say which broker they read."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_node.hardware import shipped_classes_file
from edgewise.local_broker import BrokerInfo, MqttProbe
from edgewise.releases import KeySet, Manifest, decode_document, decode_envelope
from tests.cli_harness import init_keys, run
from tests.updatekit import CLOUD_MODEL, EDGE_MODEL

ProbeFactory = Callable[..., MqttProbe]


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    return init_keys(tmp_path / "keys")


@pytest.fixture
def roots() -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {"fleet": f"fleet-{tag}", "models": f"models-{tag}"}


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "edge.onnx", tmp_path / "cloud.onnx"
    first.write_bytes(EDGE_MODEL)
    second.write_bytes(CLOUD_MODEL)
    return first, second


def _publish(
    model: Path, keys: Path, release: int, broker: BrokerInfo | None, roots: dict[str, str],
    *extra: str, code: int = 0, hw_class: str = "generic-cpu",
) -> str:  # fmt: skip
    where = ["--broker", broker.url] if broker is not None else []
    return run(
        "model", "publish", str(model), "--name", "digits", "--release", str(release),
        "--hw-class", hw_class, "-k", str(keys), "--fleet-root", roots["fleet"],
        "--models-root", roots["models"], "--settle-s", "0.5", *where, *extra, code=code,
    )  # fmt: skip


def _retained(probe: MqttProbe, topic_filter: str) -> dict[str, bytes]:
    """What the broker holds under ``topic_filter``: a fresh subscription gets it, then a
    control message published after it on the same connection marks the end."""
    end = f"zz-end/{uuid.uuid4().hex}"
    probe.subscribe(topic_filter)
    probe.subscribe(end)
    probe.publish(end, b"end")
    probe.wait_for(lambda m: m.topic == end, 10, count=1)
    return {m.topic: m.payload for m in probe.messages if m.retain and m.payload}


def _manifest(payload: bytes) -> Manifest:
    return decode_document(decode_envelope(payload), Manifest)


def test_publish_of_an_older_release_refused_and_retained_state_unchanged(
    keys: Path, tmp_path: Path, models: tuple[Path, Path], mosquitto: BrokerInfo,
    mqtt_probe: ProbeFactory, roots: dict[str, str],
) -> None:  # fmt: skip
    """Release 3 is on the broker, published from another machine (another keys directory:
    no local history knows it). Release 2 (and 3 again) must be refused from the broker's
    retained manifest alone: nodes holding 3 would refuse them, and the retained desired state
    would go backwards for every node not yet updated."""
    first, second = models
    elsewhere = tmp_path / "other-keys"
    run("keys", "init", "--out-dir", str(elsewhere))
    _publish(first, elsewhere, 3, mosquitto, roots)
    topic = f"{roots['fleet']}/generic-cpu/models/digits"
    before = _retained(mqtt_probe(), f"{roots['fleet']}/#")
    assert _manifest(before[topic]).release == 3
    for release in (2, 3):
        out = _publish(second, keys, release, mosquitto, roots, code=2)
        assert f"not above release 3, the last published (retained on {topic}" in out
        assert mosquitto.url in out
        assert "--release 4" in out
    assert _retained(mqtt_probe(), f"{roots['fleet']}/#") == before
    chunks = _retained(
        mqtt_probe(), f"{roots['models']}/{hashlib.sha256(CLOUD_MODEL).hexdigest()}/+"
    )
    assert chunks == {}  # refused before a single chunk went out
    assert not (keys / "releases" / "digits.jsonl").exists()  # and nothing recorded


def test_publish_of_a_release_the_history_already_has_refused_even_offline(
    keys: Path, tmp_path: Path, models: tuple[Path, Path], roots: dict[str, str]
) -> None:
    first, second = models
    _publish(first, keys, 5, None, roots, "--out", str(tmp_path / "r5"))
    out = _publish(second, keys, 4, None, roots, "--out", str(tmp_path / "r4"), code=2)
    assert "not above release 5" in out and "publish history" in out
    assert not (tmp_path / "r4").exists()
    history = (keys / "releases" / "digits.jsonl").read_text().splitlines()
    assert [json.loads(line)["release"] for line in history] == [5]


def test_force_publishes_an_older_release_and_says_so(
    keys: Path, models: tuple[Path, Path], mosquitto: BrokerInfo, mqtt_probe: ProbeFactory,
    roots: dict[str, str],
) -> None:  # fmt: skip
    first, second = models
    _publish(first, keys, 3, mosquitto, roots)
    out = _publish(second, keys, 2, mosquitto, roots, "--force")
    assert "note: --force: publishing release 2 of digits at or below release 3" in out
    held = _retained(mqtt_probe(), f"{roots['fleet']}/#")
    assert _manifest(held[f"{roots['fleet']}/generic-cpu/models/digits"]).release == 2


def test_publish_to_a_mistyped_hardware_class_refused_and_nothing_published(
    keys: Path, models: tuple[Path, Path], mosquitto: BrokerInfo, mqtt_probe: ProbeFactory,
    roots: dict[str, str],
) -> None:  # fmt: skip
    first, _ = models
    out = _publish(first, keys, 2, mosquitto, roots, code=2, hw_class="generic-cpuu")
    assert "--hw-class generic-cpuu: not a class of the shipped classes file" in out
    assert "generic-cpu, " in out  # the classes there are named
    assert _retained(mqtt_probe(), f"{roots['fleet']}/#") == {}
    assert _retained(mqtt_probe(), f"{roots['models']}/#") == {}
    assert not (keys / "releases").exists()


def test_a_class_of_the_operators_classes_file_is_accepted_and_force_overrides(
    keys: Path, tmp_path: Path, models: tuple[Path, Path], roots: dict[str, str]
) -> None:
    first, _ = models
    classes = tmp_path / "hardware_classes.toml"
    shipped = shipped_classes_file().read_text()
    classes.write_text(
        shipped + "\n[lab-gw]\n" + shipped.split("[generic-cpu]", 1)[1].split("\n[", 1)[0]
    )
    out = _publish(first, keys, 2, None, roots, "--out", str(tmp_path / "o2"), code=2,
                   hw_class="lab-gw")  # fmt: skip
    assert "not a class of the shipped classes file" in out
    _publish(first, keys, 2, None, roots, "--out", str(tmp_path / "o2"), "--hw-classes-file",
             str(classes), hw_class="lab-gw")  # fmt: skip
    assert (tmp_path / "o2" / "manifest-lab-gw.bin").is_file()
    forced = _publish(first, keys, 3, None, roots, "--out", str(tmp_path / "o3"), "--force",
                      hw_class="lab-gw")  # fmt: skip
    assert "note: --force: --hw-class lab-gw: not a class" in forced
    assert (tmp_path / "o3" / "manifest-lab-gw.bin").is_file()


def test_key_set_from_a_stale_copy_of_the_keys_directory_refused_and_the_copy_unchanged(
    keys: Path, tmp_path: Path, mosquitto: BrokerInfo, mqtt_probe: ProbeFactory,
    roots: dict[str, str],
) -> None:  # fmt: skip
    """Keys restored from an old backup would publish a key set version the nodes already
    passed (refused as key_set_rollback), without the release keys added since."""
    where = ["--broker", mosquitto.url, "--fleet-root", roots["fleet"], "--settle-s", "0.5"]
    run("keys", "publish-set", "-k", str(keys), *where)
    stale = tmp_path / "stale-keys"
    shutil.copytree(keys, stale)
    run("keys", "rotate", "-k", str(keys), *where)  # v2 on the broker, a key the copy lacks
    files = {p.name: p.read_bytes() for p in stale.iterdir() if p.is_file()}
    for command in (["rotate"], ["publish-set"]):
        out = run("keys", *command, "-k", str(stale), *where, code=2)
        assert f"{mosquitto.url} already holds key set v2" in out and "would publish v2" in out
        assert {p.name: p.read_bytes() for p in stale.iterdir() if p.is_file()} == files
    held = _retained(mqtt_probe(), f"{roots['fleet']}/keys")
    assert decode_document(decode_envelope(held[f"{roots['fleet']}/keys"]), KeySet).version == 2
    forced = run("keys", "publish-set", "-k", str(stale), *where, "--force")
    assert "published key set v2" in forced


def test_commands_that_read_retained_state_say_which_broker_they_read(
    keys: Path, models: tuple[Path, Path], mosquitto: BrokerInfo, roots: dict[str, str]
) -> None:
    first, _ = models
    published = _publish(first, keys, 2, mosquitto, roots)
    topic = f"{roots['fleet']}/generic-cpu/models/digits"
    assert f"read 0 retained messages under {topic} from {mosquitto.url}" in published
    edge_root = f"edge-{uuid.uuid4().hex[:6]}"
    status = run("model", "status", "--broker", mosquitto.url, "--edge-root", edge_root,
                 "--settle-s", "0.5")  # fmt: skip
    assert f"from {mosquitto.url}" in status
    keys_out = run("keys", "publish-set", "-k", str(keys), "--broker", mosquitto.url,
                   "--fleet-root", roots["fleet"], "--settle-s", "0.5")  # fmt: skip
    assert f"under {roots['fleet']}/keys from {mosquitto.url}" in keys_out
    assert f"published key set v1 retained on {roots['fleet']}/keys at {mosquitto.url}" in (
        keys_out
    )
