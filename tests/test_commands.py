"""Operator commands on the node's updater, against a real Mosquitto: recorded in the journal
before they are acknowledged, run once and in order, a full queue refused and reported, garbage
refused before it takes a place in the queue, rejections logged and reported at a capped rate,
wire text escaped in the log."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from edge_node.updates.journal import CommandJournal
from edge_node.updates.rejects import ControlRejects, Rejection
from edgewise.local_broker import BrokerInfo
from edgewise.releases import Command, Reason, generate, sign
from schemas import log_text
from tests.test_updates import running_updater
from tests.updatekit import CLOUD_MODEL, NOW, Fleet, command, manifest, run_async
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(60)


def _command(node_id: str, name: str = "publish_telemetry", **kw: Any) -> Command:
    return command(node_id, NOW, name, **kw)


def _journal_rows(state_dir: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(state_dir / "commands.db") as db:
        return list(db.execute("SELECT id, state FROM commands ORDER BY seq"))


@run_async
async def test_commands_run_once_in_order_and_are_journaled(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    fleet = Fleet()
    ran: list[str] = []
    async with running_updater(mosquitto, tmp_path, fleet) as u:
        u.manager.commands["set_threshold"] = lambda args: ran.append(args["n"]) or "ok"
        cmds = [_command(u.node_id, "set_threshold", args={"n": str(i)}) for i in range(10)]
        for c in cmds:
            await u.send_command(sign(c, fleet.release))
        await u.wait_kind("command_done", count=10)
        await u.send_command(sign(cmds[3], fleet.release))  # a copy: refused, not run
        await u.wait_kind("command_rejected:replayed")
        done = [e.ref for e in u.events() if e.kind == "command_done"]
    assert ran == [str(i) for i in range(10)]
    assert done == [c.id for c in cmds]
    assert _journal_rows(u.state_dir) == [(c.id, "done") for c in cmds]


@run_async
async def test_a_full_queue_refuses_and_reports_the_command(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    fleet = Fleet()
    release = asyncio.Event()
    ran: list[str] = []

    async def slow(args: Any) -> str:
        await release.wait()
        ran.append(args["n"])
        return "ok"

    async with running_updater(mosquitto, tmp_path, fleet, command_queue_max=2) as u:
        u.manager.commands["set_threshold"] = slow
        cmds = [_command(u.node_id, "set_threshold", args={"n": str(i)}) for i in range(4)]
        for c in cmds:
            await u.send_command(sign(c, fleet.release))
        await u.wait_kind("command_rejected:queue_full", count=2)
        release.set()
        await u.wait_kind("command_done", count=2)
        refused = [e.ref for e in u.events() if e.reason == "queue_full"]
    assert ran == ["0", "1"]  # the two the queue took, in order
    assert refused == [cmds[2].id, cmds[3].id]  # the others refused and reported, by id


@run_async
async def test_garbage_never_crowds_out_genuine_commands(
    mosquitto: BrokerInfo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A queue with room for exactly the 3 genuine commands, sent among 600 garbage messages:
    all 3 run (garbage takes no place); the garbage is counted, logged at most once a second
    per reason, reported at a capped rate."""
    fleet = Fleet()
    caplog.set_level(logging.INFO)
    ran: list[str] = []
    stranger = generate()
    async with running_updater(mosquitto, tmp_path, fleet, command_queue_max=3) as u:
        u.manager.commands["set_threshold"] = lambda args: ran.append(args["n"]) or "ok"
        genuine = [_command(u.node_id, "set_threshold", args={"n": str(i)}) for i in range(3)]
        garbage: list[bytes] = []
        for i in range(300):
            garbage.append(b"\x00\xff garbage \x1b[31m" + str(i).encode())  # malformed
            garbage.append(sign(_command(u.node_id), stranger))  # unknown_key
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i, g in enumerate(garbage):
            if i % 200 == 0:
                await u.send_command(sign(genuine[i // 200], fleet.release))
            await u.operator.publish_nowait(u.topics.cmd(u.node_id), g)
        await u.wait_kind("command_done", count=3)
        await eventually(
            lambda: u.manager.rejects.total >= 600, "u.manager.rejects.total >= 600", timeout_s=20
        )  # no message says so
        elapsed = loop.time() - started
        counts = dict(u.manager.rejects.counts)
        events = [e for e in u.events() if e.kind == "command_rejected"]
    assert ran == ["0", "1", "2"]
    assert counts == {"command:malformed": 300, "command:unknown_key": 300}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected ")]
    for reason in ("malformed", "unknown_key"):
        mine = [x for x in lines if f": {reason}: " in x]
        assert 1 <= len(mine) <= 1 + elapsed, (reason, len(mine), elapsed)
    # a burst of 10 per reason, then 1/s
    assert len(events) <= 2 * (10 + elapsed), len(events)
    assert not any("\x1b" in x or "\x00" in x for x in lines)


def test_rejections_are_capped_per_reason_not_across_reasons() -> None:
    """A flood of one reason cannot use up the reports of another."""
    now = [0.0]
    reported: list[Rejection] = []
    rejects = ControlRejects(reported.append, events_per_s=1.0, burst=3, clock=lambda: now[0])
    for _ in range(100):
        rejects.reject(Rejection("command", "edge/x/cmd", Reason.MALFORMED, "junk"))
    rejects.reject(Rejection("manifest", "fleet/c/models/m", Reason.OLDER_RELEASE, "r1"))
    now[0] += 2.0
    rejects.reject(Rejection("command", "edge/x/cmd", Reason.MALFORMED, "junk"))
    assert [r.reason for r in reported] == [Reason.MALFORMED] * 3 + [
        Reason.OLDER_RELEASE,
        Reason.MALFORMED,
    ]
    assert rejects.total == 102 and rejects.suppressed == 97


def test_journal_keeps_received_commands_in_order_across_reopen(tmp_path: Path) -> None:
    journal = CommandJournal(tmp_path / "commands.db")
    journal.open()
    made = journal.record([("a" * 8, b"A", 10.0), ("b" * 8, b"B", 10.0), ("c" * 8, b"C", 10.0)])
    assert [e.id for e in made] == ["a" * 8, "b" * 8, "c" * 8]
    assert journal.record([("b" * 8, b"B", 10.0)]) == []  # a copy makes no entry
    journal.done("a" * 8, "done")
    journal.close()
    again = CommandJournal(tmp_path / "commands.db")
    again.open()
    assert [(e.id, e.payload) for e in again.waiting()] == [("b" * 8, b"B"), ("c" * 8, b"C")]
    assert again.done_ids() == {"a" * 8}
    assert again.prune(now=11.0) == 1 and again.done_ids() == set()
    again.close()


@pytest.mark.parametrize(
    ("wire", "shown"),
    [
        ("line\nforged", "line\\nforged"),
        ("\x1b[2Jclear", "\\x1b[2Jclear"),
        ("back\\x41slash", "back\\\\x41slash"),
        ("bidi\u202eevil", "bidi\\u202eevil"),
        (b"bytes \xff\x00", "bytes \\xff\\x00"),
        ("caf\u00e9 ok", "caf\u00e9 ok"),
    ],
)
def test_wire_text_is_escaped_for_the_log(wire: str | bytes, shown: str) -> None:
    assert log_text(wire) == shown


@run_async
async def test_garbage_on_a_chunk_topic_is_counted_and_the_download_goes_on(
    mosquitto: BrokerInfo, tmp_path: Path
) -> None:
    fleet = Fleet()
    m = manifest(CLOUD_MODEL, release=2)
    async with running_updater(mosquitto, tmp_path, fleet) as u:
        prefix = u.topics.model_chunk(m.sha256, 0)[:-1]
        for tail in ("x", "\u202e1", "-1"):  # retained: the download sees them at once
            await u.operator.publish(prefix + tail, b"\x1b[31mjunk", retain=True)
        await u.release(m, CLOUD_MODEL)
        await u.wait_kind("committed")
        counts = dict(u.manager.rejects.counts)
    assert counts == {"chunk:malformed": 3}
