"""MQTT 5 PUBLISH properties without paho's per-instance work (edgewise/mqtt/properties.py).

Sending: `PublishProperties` packs exactly what paho's own `Properties` packs for the same
values, reads back the same way, and cannot be changed once made; a real Mosquitto passes each
property on to an MQTT 5 subscriber. Receiving: whatever `read_publish_properties` and
`read_publish_v5` accept (generated and hostile input), paho's own decoders accept with the same
values; everything else they leave to paho."""

from __future__ import annotations

import asyncio
import itertools
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

from edgewise.local_broker import BrokerInfo
from edgewise.mqtt import Inbound, MqttError, PublishProperties
from edgewise.mqtt.client import read_publish_v5
from edgewise.mqtt.properties import read_publish_properties
from tests.test_mqtt_session_client import subscribed_pair

TIMEOUT_S = 20

EXPIRIES = [None, 0, 1, 2, 3600, 2**32 - 1]
TOPICS = [None, "", "edge/gw-1/reply", "edge/ünï/reply", "t" * 300]
CORRS = [None, b"", b"0123456789abcdef", bytes(range(256)), b"\x00" * 7_000]


def paho_packed(expiry: int | None, topic: str | None, corr: bytes | None) -> bytes:
    p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if expiry is not None:
        p.MessageExpiryInterval = expiry
    if topic is not None:
        p.ResponseTopic = topic
    if corr is not None:
        p.CorrelationData = corr
    packed: bytes = p.pack()  # type: ignore[no-untyped-call]
    return packed


@pytest.mark.parametrize(
    ("expiry", "topic", "corr"), list(itertools.product(EXPIRIES, TOPICS, CORRS))
)
def test_packs_as_paho_does_and_reads_back(
    expiry: int | None, topic: str | None, corr: bytes | None
) -> None:
    props = PublishProperties(
        message_expiry_interval_s=expiry, response_topic=topic, correlation_data=corr
    )
    assert props.pack() == paho_packed(expiry, topic, corr)
    back = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    back.unpack(props.pack())  # type: ignore[no-untyped-call]
    for name, value in (
        ("MessageExpiryInterval", expiry),
        ("ResponseTopic", topic),
        ("CorrelationData", corr),
    ):
        assert getattr(back, name, None) == value
        assert getattr(props, name, None) == value
    assert props.isEmpty() == (expiry is None and topic is None and corr is None)  # type: ignore[no-untyped-call]
    assert props.packetType == PacketTypes.PUBLISH


def test_fixed_once_made() -> None:
    props = PublishProperties(correlation_data=b"abc")
    with pytest.raises(AttributeError):
        props.CorrelationData = b"other"
    with pytest.raises(AttributeError):
        props.clear()
    with pytest.raises(AttributeError):
        props.unpack(b"\x00")
    assert getattr(props, "CorrelationData") == b"abc"  # noqa: B009
    assert "CorrelationData" in str(props)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"message_expiry_interval_s": -1}, "expiry"),
        ({"message_expiry_interval_s": 2**32}, "expiry"),
        ({"response_topic": "x" * 65_536}, "response topic"),
        ({"correlation_data": b"x" * 65_536}, "correlation data"),
    ],
)
def test_values_mqtt_cannot_carry_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(MqttError, match=match):
        PublishProperties(**kwargs)  # type: ignore[arg-type]


def test_a_real_broker_passes_them_on(mosquitto: BrokerInfo) -> None:
    topic = f"test/props/{uuid.uuid4().hex}"
    got: list[Inbound] = []
    done = asyncio.Event()

    def on_message(msg: Inbound) -> None:
        got.append(msg)
        done.set()

    async def scenario() -> None:
        async with asyncio.timeout(TIMEOUT_S):
            async with subscribed_pair(
                mosquitto, topic, on_message, protocol="5", keep_properties=True
            ) as (_, pub):
                props = PublishProperties(
                    message_expiry_interval_s=600,
                    response_topic="edge/gw-1/reply",
                    correlation_data=b"corr-1",
                )
                await pub.publish(topic, b"payload", qos=1, properties=props)
                await done.wait()

    asyncio.run(scenario())
    [msg] = got
    assert msg.payload == b"payload"
    assert msg.properties is not None
    assert msg.properties.ResponseTopic == "edge/gw-1/reply"
    assert msg.properties.CorrelationData == b"corr-1"
    # The broker passes on the time left, so at most what was sent.
    assert 0 < msg.properties.MessageExpiryInterval <= 600


# -- reading: what read_publish_properties accepts, paho accepts with the same values ----------

_IDS = st.sampled_from([1, 2, 3, 8, 9, 11, 35, 38, 0x7F, 0x80, 0xFF])


@st.composite
def property_sections(draw: st.DrawFn) -> bytes:
    """Properties sections: mostly well formed (the common properties, sometimes repeated or
    mixed with others), often broken (lengths that lie, bad UTF-8, forbidden characters)."""
    body = b""
    for ident in draw(st.lists(_IDS, max_size=6)):
        if ident == 1:
            value = bytes([draw(st.integers(0, 3))])
        elif ident == 2:
            value = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big")
        elif ident in (3, 8, 9, 38):
            if draw(st.booleans()):
                raw = draw(st.text(max_size=20)).encode("utf-8", "surrogatepass")
            else:
                raw = draw(st.binary(max_size=20))
            size = draw(st.one_of(st.just(len(raw)), st.integers(0, 0xFFFF)))
            value = size.to_bytes(2, "big") + raw
        else:
            value = draw(st.binary(max_size=6))
        body += bytes([ident]) + value
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]  # truncated
    length = draw(st.one_of(st.just(len(body)), st.integers(0, 300)))
    return VariableByteIntegers.encode(length) + body + draw(st.binary(max_size=4))  # type: ignore[no-any-return, no-untyped-call]


def paho_reads(section: bytes) -> tuple[dict[str, object], int] | None:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    try:
        _, size = props.unpack(section)  # type: ignore[no-untyped-call]
    except Exception:
        return None
    names = [n.replace(" ", "") for n in props.names]
    return {n: getattr(props, n) for n in names if hasattr(props, n)}, size


def ours(section: bytes, keep: bool = True) -> tuple[dict[str, object], int] | None:
    got = read_publish_properties(section, 0, keep=keep)
    if got is None:
        return None
    props, end = got
    if props is None:
        return {}, end
    names = [n.replace(" ", "") for n in props.names]
    return {n: getattr(props, n) for n in names if hasattr(props, n)}, end


@settings(max_examples=3000, deadline=None)
@given(property_sections())
def test_reading_agrees_with_paho_or_leaves_the_section_to_it(section: bytes) -> None:
    mine = ours(section)
    if mine is None:
        return  # paho reads it (or refuses it)
    assert paho_reads(section) == mine
    assert ours(section, keep=False) == ({}, mine[1])


@pytest.mark.parametrize(
    "section",
    [
        b"",  # no length at all
        b"\x05\x02\x00\x00",  # length says 5, 3 bytes follow
        b"\x06\x02\x00\x00\x00\x01\x01",  # expiry, then an identifier without its value
        b"\x03\x08\x00\x05",  # response topic longer than the section
        b"\x04\x08\x00\x02\xc3\x28",  # invalid UTF-8
        b"\x05\x08\x00\x03a\x00b",  # U+0000 in a string
        b"\x06\x03\x00\x03\xef\xbb\xbf",  # U+FEFF in a string
        b"\x05\x08\x00\x03\xed\xa0\x80",  # a surrogate, encoded
        b"\x0a\x02\x00\x00\x00\x01\x02\x00\x00\x00\x02",  # expiry twice
        b"\x02\x01\x02",  # payload format indicator 2
        b"\x01\x01",  # payload format indicator without its byte
        b"\x03\x23\x00\x01",  # topic alias: paho's to read
        b"\x80\x01" + b"\x09\x00\x7d" + b"x" * 125,  # a 128-byte section: paho's to read
        b"\x02\xff\x7f",  # an identifier in two bytes
    ],
)
def test_anything_unusual_is_left_to_paho(section: bytes) -> None:
    assert ours(section) is None


def test_the_common_properties_read_as_paho_reads_them() -> None:
    props = PublishProperties(
        message_expiry_interval_s=30, response_topic="edge/gw-1/reply", correlation_data=b"c1"
    )
    section = props.pack() + b"payload"
    assert ours(section) == paho_reads(section)
    assert ours(section) == (
        {"MessageExpiryInterval": 30, "ResponseTopic": "edge/gw-1/reply", "CorrelationData": b"c1"},
        len(props.pack()),
    )


# -- whole PUBLISH packets: read_publish_v5 against paho's decoder -----------------------------


@settings(max_examples=1500, deadline=None)
@given(
    topic=st.binary(max_size=40),
    qos=st.integers(0, 3),
    flags=st.integers(0, 15),
    mid=st.integers(0, 0xFFFF),
    section=property_sections(),
    payload=st.binary(max_size=64),
    cut=st.one_of(st.none(), st.integers(0, 200)),
)
def test_publish_reading_agrees_with_paho_or_leaves_the_packet_to_it(
    topic: bytes, qos: int, flags: int, mid: int, section: bytes, payload: bytes, cut: int | None
) -> None:
    header = 0x30 | (flags & 0x09) | (qos << 1)
    packet = len(topic).to_bytes(2, "big") + topic
    if qos:
        packet += mid.to_bytes(2, "big")
    packet += section + payload
    if cut is not None:
        packet = packet[:cut]
    mine = read_publish_v5(header, packet)
    if mine is None:
        return
    theirs = _packet.decode_publish(header, packet, MQTTProtocolVersion.MQTTv5)
    assert (mine.topic, mine.mid, mine.qos, mine.dup, mine.retain, mine.payload) == (
        theirs.topic, theirs.mid, theirs.qos, theirs.dup, theirs.retain, theirs.payload,
    )  # fmt: skip
    assert mine.properties is not None and theirs.properties is not None
    assert str(mine.properties) == str(theirs.properties)
