"""``edgewise cmd``: signed operator commands to one node or a hardware class."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Annotated, get_args

import typer

from edgewise.cli.connect import (
    DEFAULT_BROKER,
    BrokerOpt,
    PasswordFileOpt,
    TlsCaOpt,
    UsernameOpt,
    broker_settings,
    fail,
)
from edgewise.cli.keys_cmd import Keyring, KeysDirOpt, out
from edgewise.cli.retained import write_file
from edgewise.releases import Command, Target, sign
from edgewise.releases.wire import CommandName
from schemas import ContractError, Topics, validate_level

cmd_app = typer.Typer(help="Signed operator commands.", no_args_is_help=True)
NAMES = get_args(CommandName)


@cmd_app.command("send")
def send(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(NAMES)}.")],
    args: Annotated[list[str] | None, typer.Argument(help="KEY=VALUE arguments.")] = None,
    node: Annotated[str | None, typer.Option("--node", help="The node to command.")] = None,
    hw_class: Annotated[
        str | None, typer.Option("--hw-class", help="Command every node of this class.")
    ] = None,
    ttl_s: Annotated[
        float, typer.Option("--ttl-s", min=1, max=7 * 86400, help="Valid for this long.")
    ] = 600.0,
    keys_dir: KeysDirOpt = Path("edgewise-keys"),
    broker: BrokerOpt = DEFAULT_BROKER,
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    tls_ca: TlsCaOpt = None,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write the signed command to FILE instead.")
    ] = None,
    edge_root: Annotated[
        str, typer.Option("--edge-root", help="Topic root of node topics (edge/{node}/cmd).")
    ] = "edge",
    fleet_root: Annotated[
        str, typer.Option("--fleet-root", help="Topic root of fleet topics (fleet/{class}/cmd).")
    ] = "fleet",
) -> None:
    """Sign a command (unique id, issued-at, expiry) and send it on `edge/{node}/cmd` or
    `fleet/{class}/cmd`. The node reports the outcome on `edge/{node}/events`.

    Example: `edgewise cmd send --node gw-1 set_threshold escalate_below=0.8`.
    """
    if name not in NAMES:
        fail(f"unknown command {name!r}; one of: {', '.join(NAMES)}")
    if (node is None) == (hw_class is None):
        fail("give exactly one of --node ID and --hw-class CLASS")
    parsed: dict[str, str] = {}
    for pair in args or []:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            fail(f"argument {pair!r}: want KEY=VALUE")
        parsed[key] = value
    try:
        target_name = validate_level(node or hw_class or "")
    except ContractError as exc:
        fail(f"{'--node' if node else '--hw-class'}: {exc.detail}")
    ring = Keyring.load(keys_dir)
    now = time.time()
    command = Command(
        id=uuid.uuid4().hex,
        name=name,  # type: ignore[arg-type]
        args=parsed,
        issued_at=now,
        expires_at=now + ttl_s,
        target=Target(node=node, hw_class=hw_class),
    )
    data = sign(command, ring.release_key())
    topics = Topics(edge_root=edge_root, fleet_root=fleet_root)
    topic = topics.cmd(target_name) if node else topics.fleet_cmd(target_name)
    if out_file is not None:
        write_file(out_file, data)
        out.print(f"wrote command {command.id} to {out_file}")
        out.print(f"send it: mosquitto_pub -q 1 -t {topic} -f {out_file}")
        return
    from edgewise.cli.connect import publish, run, session

    conn = broker_settings(broker, username, password_file, tls_ca)

    async def go() -> None:  # one publish, not retained: a command is an event
        async with session(conn, purpose="cmd") as s:
            await publish(s, conn, topic, data)

    run(go())
    out.print(
        f"sent {name} ({command.id}) on {topic} at {conn.url}; outcome on {edge_root}/<node>/events"
    )
