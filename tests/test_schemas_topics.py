"""schemas.topics: builders refuse unsafe names; parsing and filter validation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import ContractError, Topics, validate_filter, validate_level, validate_topic

BAD_LEVELS = ["", "+", "#", "a+", "a#b", "a/b", "/", "a\x00", "\x00", "$SYS", "$", "x" * 129,
              "tab\there", "new\nline", "del\x7f", "é" * 65, "\ud800"]  # fmt: skip
GOOD_LEVELS = ["cam-3", "a", "x" * 128, "é" * 64, "a$", "sensor.1", "温度", "a b"]

T = Topics()
NODE_BUILDERS: list[Callable[[str], str]] = [
    T.results,
    T.telemetry,
    T.status,
    T.events,
    T.deadletter,
    T.reply,
    T.cmd,
    T.escalations,
    T.fleet_cmd,
]


def bad_topic(fn: Callable[[], object]) -> None:
    with pytest.raises(ContractError) as excinfo:
        fn()
    assert excinfo.value.reason == "bad_topic"


@pytest.mark.parametrize("level", BAD_LEVELS, ids=repr)
def test_validate_level_refuses(level: str) -> None:
    bad_topic(lambda: validate_level(level))


@pytest.mark.parametrize("level", GOOD_LEVELS, ids=repr)
def test_validate_level_accepts(level: str) -> None:
    assert validate_level(level) == level


@pytest.mark.parametrize("level", BAD_LEVELS, ids=repr)
def test_builders_refuse_bad_names(level: str) -> None:
    bad_topic(lambda: T.sensor(level, "s"))
    bad_topic(lambda: T.sensor("d", level))
    for build in NODE_BUILDERS:
        bad_topic(lambda build=build: build(level))  # type: ignore[misc]
    bad_topic(lambda: T.fleet_model("class", level))
    bad_topic(lambda: T.model_chunk(level, 0))
    bad_topic(lambda: T.escalations_filter(level))


def test_default_topics() -> None:
    assert T.sensor("cam-3", "digits") == "sensors/cam-3/digits"
    assert T.sensor_filter() == "sensors/+/+"
    assert T.results("gw-1") == "edge/gw-1/results"
    assert T.telemetry("gw-1") == "edge/gw-1/telemetry"
    assert T.status("gw-1") == "edge/gw-1/status"
    assert T.events("gw-1") == "edge/gw-1/events"
    assert T.deadletter("gw-1") == "edge/gw-1/deadletter"
    assert T.reply("gw-1") == "edge/gw-1/reply"
    assert T.cmd("gw-1") == "edge/gw-1/cmd"
    assert T.escalations("digits") == "cloud/escalations/digits"
    assert T.escalations_filter() == "$share/workers/cloud/escalations/+"
    assert T.escalations_filter(None) == "cloud/escalations/+"
    assert T.fleet_cmd("rpi4") == "fleet/rpi4/cmd"
    assert T.fleet_model("rpi4", "digits") == "fleet/rpi4/models/digits"
    assert T.fleet_keys() == "fleet/keys"
    assert T.model_chunk("ab12", 3) == "models/ab12/3"
    bad_topic(lambda: T.model_chunk("ab12", -1))


def test_multi_level_roots() -> None:
    t = Topics(sensors_root="acme/site-1/sensors", edge_root="acme/edge")
    assert t.sensor("d", "s") == "acme/site-1/sensors/d/s"
    assert t.sensor_filter() == "acme/site-1/sensors/+/+"
    assert t.parse_sensor("acme/site-1/sensors/d/s") == ("d", "s")
    assert t.results("n") == "acme/edge/n/results"
    bad_topic(lambda: t.parse_sensor("sensors/d/s"))


@pytest.mark.parametrize(
    "root", ["", "a/", "/a", "a//b", "a/+/b", "#", "a\x00", "$SYS/x", "a/#"], ids=repr
)
def test_roots_are_validated(root: str) -> None:
    for field in ("sensors_root", "edge_root", "cloud_root", "fleet_root", "models_root"):
        bad_topic(lambda field=field: Topics(**{field: root}))  # type: ignore[misc]


@given(
    st.text(
        st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/+#$"),
        min_size=1,
        max_size=30,
    ),
    st.text(
        st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/+#$"),
        min_size=1,
        max_size=30,
    ),
)
def test_parse_sensor_round_trip(device: str, sensor: str) -> None:
    topic = T.sensor(device, sensor)
    assert validate_topic(topic) == topic
    assert T.parse_sensor(topic) == (device, sensor)


@pytest.mark.parametrize(
    "topic",
    [
        "sensors/d",
        "sensors/d/s/x",
        "sensors//s",
        "sensors/d/",
        "sensors/+/s",
        "sensors/d/#",
        "other/d/s",
        "sensorsX/d/s",
        "sensors",
        "",
        "sensors/d/$s",
        "sensors/d\x00/s",
    ],
    ids=repr,
)
def test_parse_sensor_refuses(topic: str) -> None:
    bad_topic(lambda: T.parse_sensor(topic))


def test_validate_topic() -> None:
    assert validate_topic("edge/gw-1/results") == "edge/gw-1/results"
    for topic in ["", "a//b", "/a", "a/", "a/+", "a/#", "$SYS/x", "a\x00b", "x/" * 40_000 + "x"]:
        bad_topic(lambda topic=topic: validate_topic(topic))  # type: ignore[misc]
    near_cap = "/".join(["x" * 127] * 512)  # 65_535 bytes
    assert len(near_cap.encode()) == 65_535
    assert validate_topic(near_cap) == near_cap
    bad_topic(lambda: validate_topic(near_cap + "x"))


@pytest.mark.parametrize(
    "f",
    [
        "sensors/+/+",
        "sensors/#",
        "#",
        "+",
        "+/+/#",
        "sensors/cam-3/digits",
        "$share/workers/cloud/escalations/+",
        "$share/g/#",
        "acme/sensors/+/temp",
    ],
)
def test_validate_filter_accepts(f: str) -> None:
    assert validate_filter(f) == f


@pytest.mark.parametrize(
    "f",
    [
        "",
        "sensors/#/x",
        "#/a",
        "sensors/a+",
        "sensors/+a",
        "sensors/a#",
        "sensors//x",
        "sensors/",
        "$SYS/#",
        "$share/workers",
        "$share//sensors/#",
        "$share/+/sensors/#",
        "$share/g#/x",
        "$share/g/",
        "a\x00/#",
    ],
    ids=repr,
)
def test_validate_filter_refuses(f: str) -> None:
    bad_topic(lambda: validate_filter(f))
