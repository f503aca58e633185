"""The pure verifier: bytes in, verdict out, each attack refused with its own reason (no broker)."""

from __future__ import annotations

import ast
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgewise.releases import (
    Command,
    KeySet,
    Reason,
    Rejected,
    Target,
    cohort_point,
    decode_envelope,
    envelope_id,
    generate,
    in_cohort,
    sign,
    verify_command,
    verify_key_set,
    verify_manifest,
)
from edgewise.releases.events import UpdateEvent, decode_event, encode_event
from edgewise.releases.wire import MAX_ENVELOPE_BYTES, Envelope, Signature, encode
from tests.updatekit import CLOUD_MODEL, DAY, NOW, Fleet, manifest

NODE = "gw-1"


@pytest.fixture
def fleet() -> Fleet:
    return Fleet()


@pytest.fixture
def keys(fleet: Fleet) -> KeySet:
    return fleet.key_set()


def _verify(data: bytes, keys: KeySet | None, **kw: object) -> object:
    args: dict[str, object] = {
        "keys": keys,
        "node_id": NODE,
        "hw_class": "cpu",
        "floor": 1,
        "installed_sha256": None,
        "now": NOW,
    }
    args.update(kw)
    return verify_manifest(data, **args)  # type: ignore[arg-type]


def _reason(data: bytes, keys: KeySet | None, **kw: object) -> Reason:
    with pytest.raises(Rejected) as info:
        _verify(data, keys, **kw)
    return info.value.reason


def test_good_manifest_verifies(fleet: Fleet, keys: KeySet) -> None:
    m = manifest(CLOUD_MODEL)
    verdict = verify_manifest(
        sign(m, fleet.release),
        keys=keys,
        node_id=NODE,
        hw_class="cpu",
        floor=1,
        installed_sha256=None,
        now=NOW,
    )
    assert verdict.manifest == m
    assert verdict.status == "install"
    assert verdict.key_id == keys.keys[0].id


def test_running_release_is_current_not_rejected(fleet: Fleet, keys: KeySet) -> None:
    m = manifest(CLOUD_MODEL, release=3)
    verdict = _verify(sign(m, fleet.release), keys, floor=3, installed_sha256=m.sha256)
    assert verdict.status == "current"  # type: ignore[attr-defined]


def test_unknown_key_rejected(fleet: Fleet, keys: KeySet) -> None:
    assert _reason(sign(manifest(CLOUD_MODEL), generate()), keys) is Reason.UNKNOWN_KEY


def test_root_key_cannot_sign_releases(fleet: Fleet, keys: KeySet) -> None:
    assert _reason(sign(manifest(CLOUD_MODEL), fleet.root), keys) is Reason.UNKNOWN_KEY


def test_revoked_key_rejected(fleet: Fleet) -> None:
    new = generate()
    keys = fleet.key_set(new, version=2, revoked=[fleet.release])
    assert _reason(sign(manifest(CLOUD_MODEL), fleet.release), keys) is Reason.REVOKED_KEY
    # The rotated key signs fine.
    assert _verify(sign(manifest(CLOUD_MODEL), new), keys).status == "install"  # type: ignore[attr-defined]


def test_signature_over_other_bytes_rejected(fleet: Fleet, keys: KeySet) -> None:
    good = decode_envelope(sign(manifest(CLOUD_MODEL, release=2), fleet.release))
    other = decode_envelope(sign(manifest(CLOUD_MODEL, release=9), fleet.release))
    forged = encode(Envelope(kind="manifest", payload=other.payload, sigs=good.sigs))
    assert _reason(forged, keys) is Reason.BAD_SIGNATURE


def test_signature_of_a_command_does_not_pass_for_a_manifest(fleet: Fleet, keys: KeySet) -> None:
    env = decode_envelope(sign(manifest(CLOUD_MODEL), fleet.release))
    relabelled = encode(Envelope(kind="command", payload=env.payload, sigs=env.sigs))
    with pytest.raises(Rejected) as info:
        verify_command(relabelled, keys=keys, node_id=NODE, hw_class="cpu", seen_ids=set(), now=NOW)
    assert info.value.reason is Reason.MALFORMED


def test_truncated_signature_rejected(fleet: Fleet, keys: KeySet) -> None:
    env = decode_envelope(sign(manifest(CLOUD_MODEL), fleet.release))
    short = Envelope(
        kind="manifest", payload=env.payload, sigs=[Signature(k=env.sigs[0].k, s=env.sigs[0].s)]
    )
    raw = msgspec.msgpack.encode(
        {
            "kind": "manifest",
            "payload": short.payload,
            "sigs": [[short.sigs[0].k, short.sigs[0].s[:40]]],
            "v": 1,
        }
    )
    assert _reason(raw, keys) is Reason.MALFORMED
    # A whole envelope cut short is malformed too.
    assert _reason(sign(manifest(CLOUD_MODEL), fleet.release)[:-7], keys) is Reason.MALFORMED


def test_flipped_signature_bit_rejected(fleet: Fleet, keys: KeySet) -> None:
    env = decode_envelope(sign(manifest(CLOUD_MODEL), fleet.release))
    sig = bytearray(env.sigs[0].s)
    sig[5] ^= 1
    bad = encode(
        Envelope(
            kind="manifest", payload=env.payload, sigs=[Signature(k=env.sigs[0].k, s=bytes(sig))]
        )
    )
    assert _reason(bad, keys) is Reason.BAD_SIGNATURE


def test_older_release_rejected(fleet: Fleet, keys: KeySet) -> None:
    assert (
        _reason(sign(manifest(CLOUD_MODEL, release=2), fleet.release), keys, floor=5)
        is Reason.OLDER_RELEASE
    )


def test_same_release_rejected(fleet: Fleet, keys: KeySet) -> None:
    data = sign(manifest(CLOUD_MODEL, release=5), fleet.release)
    assert _reason(data, keys, floor=5, installed_sha256="0" * 64) is Reason.SAME_RELEASE


def test_expired_manifest_rejected(fleet: Fleet, keys: KeySet) -> None:
    data = sign(manifest(CLOUD_MODEL, expires_at=NOW - 1), fleet.release)
    assert _reason(data, keys) is Reason.EXPIRED


def test_manifest_from_the_future_rejected(fleet: Fleet, keys: KeySet) -> None:
    data = sign(manifest(CLOUD_MODEL, now=NOW + DAY), fleet.release)
    assert _reason(data, keys) is Reason.NOT_YET_VALID


def test_expired_key_set_rejected(fleet: Fleet) -> None:
    keys = fleet.key_set(expires_at=NOW - 1, now=NOW - DAY)
    assert _reason(sign(manifest(CLOUD_MODEL), fleet.release), keys) is Reason.KEY_SET_EXPIRED
    with pytest.raises(Rejected) as info:
        verify_key_set(sign(keys, fleet.root), root_public=fleet.root_public, held=None, now=NOW)
    assert info.value.reason is Reason.KEY_SET_EXPIRED


def test_no_key_set_rejected(fleet: Fleet) -> None:
    assert _reason(sign(manifest(CLOUD_MODEL), fleet.release), None) is Reason.NO_KEY_SET


def test_wrong_hardware_class_rejected(fleet: Fleet, keys: KeySet) -> None:
    data = sign(manifest(CLOUD_MODEL, hw_classes=("edgetpu",)), fleet.release)
    assert _reason(data, keys) is Reason.WRONG_HARDWARE_CLASS


def test_outside_the_cohort_rejected(fleet: Fleet, keys: KeySet) -> None:
    point = cohort_point(NODE, "digits", 2)
    assert _reason(sign(manifest(CLOUD_MODEL, rollout_percent=point), fleet.release), keys) is (
        Reason.OUTSIDE_COHORT
    )
    wider = sign(manifest(CLOUD_MODEL, rollout_percent=min(100.0, point + 0.01)), fleet.release)
    assert _verify(wider, keys).status == "install"  # type: ignore[attr-defined]


def test_cohort_is_stable_and_about_the_right_size() -> None:
    nodes = [f"node-{i}" for i in range(4000)]
    share = sum(in_cohort(n, "digits", 7, 10.0) for n in nodes) / len(nodes)
    assert 0.08 < share < 0.12
    assert [in_cohort(n, "digits", 7, 10.0) for n in nodes[:50]] == [
        in_cohort(n, "digits", 7, 10.0) for n in nodes[:50]
    ]
    # Widening only adds nodes.
    assert all(in_cohort(n, "digits", 7, 50.0) for n in nodes if in_cohort(n, "digits", 7, 10.0))


def test_oversized_envelope_rejected_before_decoding(fleet: Fleet, keys: KeySet) -> None:
    assert _reason(b"\x81" + b"\x00" * MAX_ENVELOPE_BYTES, keys) is Reason.TOO_LARGE


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x91" * 5000 + b"\x00", b"{}", msgspec.msgpack.encode({"kind": "manifest"})],
    ids=["empty", "reserved-byte", "deep", "json", "missing-fields"],
)
def test_malformed_envelopes_rejected(data: bytes, keys: KeySet) -> None:
    assert _reason(data, keys) is Reason.MALFORMED


def test_the_order_is_signature_before_class_before_release(fleet: Fleet, keys: KeySet) -> None:
    wrong_everything = manifest(CLOUD_MODEL, release=1, hw_classes=("x",), expires_at=NOW - 1)
    assert _reason(sign(wrong_everything, generate()), keys) is Reason.UNKNOWN_KEY
    assert _reason(sign(wrong_everything, fleet.release), keys) is Reason.WRONG_HARDWARE_CLASS
    old_expired = manifest(CLOUD_MODEL, release=1, expires_at=NOW - 1)
    assert _reason(sign(old_expired, fleet.release), keys, floor=2) is Reason.OLDER_RELEASE


# ----------------------------------------------------------------------------- key sets
def test_key_set_must_be_signed_by_root(fleet: Fleet) -> None:
    forged = sign(fleet.key_set(generate()), fleet.release)
    with pytest.raises(Rejected) as info:
        verify_key_set(forged, root_public=fleet.root_public, held=None, now=NOW)
    assert info.value.reason is Reason.KEY_SET_BAD_SIGNATURE


def test_key_set_rollback_rejected(fleet: Fleet) -> None:
    held = fleet.key_set(version=3)
    for version, other in ((2, None), (3, generate())):
        data = sign(fleet.key_set(*([other] if other else []), version=version), fleet.root)
        with pytest.raises(Rejected) as info:
            verify_key_set(data, root_public=fleet.root_public, held=held, now=NOW)
        assert info.value.reason is Reason.KEY_SET_ROLLBACK
    same = verify_key_set(sign(held, fleet.root), root_public=fleet.root_public, held=held, now=NOW)
    assert same.status == "same"
    newer = verify_key_set(
        fleet.signed_key_set(version=4), root_public=fleet.root_public, held=held, now=NOW
    )
    assert newer.status == "newer"
    assert newer.key_set.version == 4


# ----------------------------------------------------------------------------- commands
def _command(**kw: object) -> Command:
    args: dict[str, object] = {
        "id": "cmd-0001-abcdef",
        "name": "recycle_session",
        "issued_at": NOW,
        "expires_at": NOW + 600,
        "target": Target(node=NODE),
    }
    args.update(kw)
    return Command(**args)  # type: ignore[arg-type]


def _command_reason(data: bytes, keys: KeySet, seen: set[str] | None = None) -> Reason:
    with pytest.raises(Rejected) as info:
        verify_command(
            data, keys=keys, node_id=NODE, hw_class="cpu", seen_ids=seen or set(), now=NOW
        )
    return info.value.reason


def test_command_verifies(fleet: Fleet, keys: KeySet) -> None:
    cmd = _command(name="set_threshold", args={"escalate_below": "0.7"})
    got = verify_command(
        sign(cmd, fleet.release), keys=keys, node_id=NODE, hw_class="cpu", seen_ids=set(), now=NOW
    )
    assert got == cmd


def test_command_replay_rejected(fleet: Fleet, keys: KeySet) -> None:
    data = sign(_command(), fleet.release)
    assert _command_reason(data, keys, {"cmd-0001-abcdef"}) is Reason.REPLAYED


def test_command_for_another_node_rejected(fleet: Fleet, keys: KeySet) -> None:
    assert _command_reason(sign(_command(target=Target(node="gw-2")), fleet.release), keys) is (
        Reason.WRONG_TARGET
    )
    assert _command_reason(sign(_command(target=Target(hw_class="tpu")), fleet.release), keys) is (
        Reason.WRONG_TARGET
    )


def test_expired_command_rejected(fleet: Fleet, keys: KeySet) -> None:
    data = sign(_command(issued_at=NOW - 700, expires_at=NOW - 100), fleet.release)
    assert _command_reason(data, keys) is Reason.EXPIRED


def test_unknown_key_command_rejected(keys: KeySet) -> None:
    assert _command_reason(sign(_command(), generate()), keys) is Reason.UNKNOWN_KEY


# ----------------------------------------------------------------------------- misc
def test_envelope_id_is_stable_and_distinct(fleet: Fleet) -> None:
    a = sign(manifest(CLOUD_MODEL, release=2), fleet.release)
    b = sign(manifest(CLOUD_MODEL, release=3), fleet.release)
    assert envelope_id(a) == envelope_id(bytes(a))
    assert envelope_id(a) != envelope_id(b)


def test_event_round_trip() -> None:
    e = UpdateEvent(
        id="x1",
        node=NODE,
        ts=NOW,
        kind="rolled_back",
        model="digits",
        release=3,
        reason="probation_failed",
    )
    assert decode_event(encode_event(e)) == e


def test_releases_package_touches_no_io() -> None:
    forbidden = {"asyncio", "io", "os", "pathlib", "shutil", "socket", "sqlite3", "subprocess",
                 "tempfile", "threading", "paho", "edge_node", "logging", "time",
                 "random"}  # fmt: skip
    files = sorted((Path(__file__).resolve().parent.parent / "edgewise/releases").glob("*.py"))
    assert len(files) >= 7
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            # its own modules and schemas only: no other part of edgewise (the MQTT layer...)
            bad = [
                n
                for n in names
                if n.split(".")[0] in forbidden
                or (n.split(".")[0] == "edgewise" and not n.startswith("edgewise.releases"))
            ]
            assert not bad, f"{path.name} imports {bad}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in {"open", "print"}, path.name


def test_reason_table_in_the_operator_guide_equals_the_enum() -> None:
    from edgewise.releases import Reason

    guide = Path(__file__).resolve().parent.parent / "docs" / "model-updates.md"
    lines = guide.read_text(encoding="utf-8").splitlines()
    start = lines.index("| reason | step | meaning |") + 2
    table: list[str] = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line.split("|")[1].strip().strip("`"))
    assert table == [r.value for r in Reason]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048))
def test_any_bytes_give_a_verdict_never_another_exception(data: bytes) -> None:
    keys = _FUZZ_FLEET.key_set()
    with pytest.raises(Rejected):
        verify_manifest(
            data, keys=keys, node_id=NODE, hw_class="cpu", floor=1, installed_sha256=None, now=NOW
        )
    with pytest.raises(Rejected):
        verify_command(data, keys=keys, node_id=NODE, hw_class="cpu", seen_ids=set(), now=NOW)
    with pytest.raises(Rejected):
        verify_key_set(data, root_public=_FUZZ_FLEET.root_public, held=None, now=NOW)


def test_every_single_bit_flip_of_a_signed_manifest_is_rejected() -> None:
    """All of them, not a sample: one flip in an unsigned envelope key was once accepted."""
    accepted = []
    for bit in range(len(_FUZZ_SIGNED) * 8):
        data = bytearray(_FUZZ_SIGNED)
        data[bit // 8] ^= 1 << (bit % 8)
        try:
            verify_manifest(bytes(data), keys=_FUZZ_FLEET.key_set(), node_id=NODE, hw_class="cpu",
                            floor=1, installed_sha256=None, now=NOW)  # fmt: skip
        except Rejected:
            continue
        accepted.append(bit)
    assert accepted == []


_FUZZ_FLEET = Fleet()
_FUZZ_SIGNED = sign(manifest(CLOUD_MODEL, with_golden=False), _FUZZ_FLEET.release)
