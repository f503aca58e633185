"""Durable file writes (edgewise.files): the target holds its old or its new content after any
failure, no temp file remains, and the file and then its directory are fsynced."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edgewise.cli.keys_cmd import Keyring, write_private
from edgewise.files import (
    atomic_file,
    atomic_path,
    create_durably,
    replace_durably,
    write_atomic,
)


class Boom(Exception):
    pass


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Every fsync (with the path its fd is open on), rename and link, in order."""
    seen: list[tuple[str, ...]] = []
    fsync, replace, link = os.fsync, os.replace, os.link

    def recording_fsync(fd: int) -> None:
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append(("replace", str(src), str(dst)))
        replace(src, dst)

    def recording_link(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append(("link", str(src), str(dst)))
        link(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    monkeypatch.setattr(os, "link", recording_link)
    return seen


def _temp_of(target: Path, name: str) -> bool:
    return Path(name).parent == target.parent and Path(name).name.startswith(f".{target.name}.")


def test_write_fsyncs_the_file_renames_it_then_fsyncs_the_directory(
    tmp_path: Path, events: list[tuple[str, ...]]
) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["state.json"]
    (fsync_file, renamed, fsync_dir) = events
    tmp = renamed[1]
    assert _temp_of(target, tmp) and tmp.endswith(".tmp")
    assert fsync_file == ("fsync", tmp)  # the content, before the rename
    assert renamed == ("replace", tmp, str(target))
    assert fsync_dir == ("fsync", str(tmp_path))  # the rename, after it


def test_a_failure_between_write_and_rename_keeps_the_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "keyring.json"
    target.write_bytes(b"old")

    def failing_replace(src: object, dst: object) -> None:
        raise Boom("power cut")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(Boom):
        write_atomic(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["keyring.json"]  # no temp file left
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(Boom):
        write_atomic(fresh, b"new")
    assert not fresh.exists() and os.listdir(tmp_path) == ["keyring.json"]


def test_a_failure_while_writing_keeps_the_old_content(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")

    def half_then_fail() -> None:
        with atomic_file(target) as f:
            f.write(b"half of the new")
            raise Boom("hash mismatch")

    with pytest.raises(Boom):
        half_then_fail()
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_a_new_file_gets_the_mode_of_a_file_made_as_usual(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    write_atomic(tmp_path / "durable", b"x")
    assert stat.S_IMODE((tmp_path / "durable").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_a_path_writer_is_fsynced_renamed_and_its_directory_fsynced(
    tmp_path: Path, events: list[tuple[str, ...]]
) -> None:
    out = tmp_path / "export.csv"
    with atomic_path(out) as tmp:
        assert _temp_of(out, str(tmp)) and not out.exists()
        tmp.write_text("a,b\n", encoding="utf-8")
    assert out.read_text(encoding="utf-8") == "a,b\n"
    assert events == [
        ("fsync", str(tmp)),
        ("replace", str(tmp), str(out)),
        ("fsync", str(tmp_path)),
    ]
    assert os.listdir(tmp_path) == ["export.csv"]

    def half_then_fail() -> None:
        with atomic_path(out) as tmp:
            tmp.write_text("half", encoding="utf-8")
            raise Boom("the store went away")

    with pytest.raises(Boom):
        half_then_fail()
    assert out.read_text(encoding="utf-8") == "a,b\n"
    assert os.listdir(tmp_path) == ["export.csv"]


def test_create_never_replaces_and_is_durable(
    tmp_path: Path, events: list[tuple[str, ...]]
) -> None:
    key = tmp_path / "root.key"
    create_durably(key, b"secret")
    assert key.read_bytes() == b"secret"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    (fsync_file, linked, fsync_dir) = events
    assert fsync_file == ("fsync", linked[1]) and linked[2] == str(key)
    assert fsync_dir == ("fsync", str(tmp_path))
    with pytest.raises(FileExistsError):
        create_durably(key, b"another")
    assert key.read_bytes() == b"secret"
    assert os.listdir(tmp_path) == ["root.key"]


def test_a_durable_move_fsyncs_both_directories(
    tmp_path: Path, events: list[tuple[str, ...]]
) -> None:
    (tmp_path / "staged").mkdir()
    (tmp_path / "artifacts").mkdir()
    src = tmp_path / "staged" / "m.onnx"
    src.write_bytes(b"model")
    dst = tmp_path / "artifacts" / "m.onnx"
    replace_durably(src, dst)
    assert dst.read_bytes() == b"model" and not src.exists()
    assert events[0] == ("replace", str(src), str(dst))
    assert sorted(events[1:]) == [
        ("fsync", str(tmp_path / "artifacts")),
        ("fsync", str(tmp_path / "staged")),
    ]


def test_the_key_ring_and_private_keys_are_written_durably(
    tmp_path: Path, events: list[tuple[str, ...]]
) -> None:
    """The key ring's version counter protects nodes against key-set rollback: a power cut
    after `keys rotate` must not bring back the older ring."""
    ring = Keyring(tmp_path, version=7, release_keys=["k1"], revoked=[])
    ring.save()
    assert Keyring.load(tmp_path).version == 7
    fsynced = [e[1] for e in events if e[0] == "fsync"]
    renamed = [e for e in events if e[0] == "replace"]
    assert renamed and renamed[-1][2] == str(tmp_path / "keyring.json")
    assert renamed[-1][1] in fsynced  # the content before the rename
    assert fsynced[-1] == str(tmp_path)  # the rename after it
    events.clear()
    write_private(tmp_path / "release-k1.key", b"private")
    assert ("fsync", str(tmp_path)) in events
    assert stat.S_IMODE((tmp_path / "release-k1.key").stat().st_mode) == 0o600
