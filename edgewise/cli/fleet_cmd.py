"""``edgewise fleet status``: listen to every node's status and telemetry for a while, then
print one row per node and a fleet-wide p50/p99 from the merged latency sketches."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgewise.cli import logs
from edgewise.cli.connect import (
    DEFAULT_BROKER,
    Broker,
    BrokerOpt,
    PasswordFileOpt,
    TlsCaOpt,
    UsernameOpt,
    broker_settings,
    fail,
    run,
    session,
)

if TYPE_CHECKING:  # imported when the command runs: `edgewise --help` stays quick
    from edgewise.cli.fleet_view import FleetView
    from edgewise.mqtt import Inbound
    from schemas import Limits, Topics

EdgeRootOpt = Annotated[
    str, typer.Option("--edge-root", help="Topic root of the nodes (edge/{node}/...).")
]
CloudRootOpt = Annotated[
    str, typer.Option("--cloud-root", help="Topic root of the workers (cloud/workers/{id}/...).")
]
BridgeRootOpt = Annotated[
    str, typer.Option("--bridge-root", help="Topic root of the bridges (bridges/{bridge}/...).")
]

fleet_app = typer.Typer(help="The fleet: what every node reports.", no_args_is_help=True)

_err = Console(stderr=True)


async def listen(
    broker: Broker,
    *,
    duration_s: float,
    topics: Topics | None = None,
    limits: Limits | None = None,
    console: Console | None = None,
) -> FleetView:
    """Collect status (retained) and telemetry for ``duration_s``, once connected and
    subscribed (:class:`~edgewise.cli.connect.BrokerTrouble` if that fails)."""
    from edgewise.cli.fleet_view import FleetView
    from schemas import Limits, Topics

    view = FleetView(topics or Topics(), limits or Limits())

    def on_message(msg: Inbound) -> None:
        view.ingest(msg.topic, msg.payload)

    root = view.topics.edge_root
    filters = [f"{root}/+/status", f"{root}/+/telemetry"]
    async with session(broker, purpose="fleet", on_message=on_message, filters=filters):
        if console is not None:
            with console.status(
                f"listening to {root}/+/status and {root}/+/telemetry for {duration_s:g} s ..."
            ):
                await asyncio.sleep(duration_s)
        else:
            await asyncio.sleep(duration_s)
    return view


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


_STATE_STYLE = {"online": "green", "degraded": "yellow", "offline": "red"}


def _serving(row: dict[str, Any]) -> str:
    """Hardware class, then what really serves: runtime and provider (or delegate)."""
    cls = row.get("hardware_class") or "-"
    runtime = row.get("runtime")
    if runtime is None:
        return escape(cls)
    provider = str(row.get("provider") or "").removesuffix("ExecutionProvider")
    return escape(f"{cls} · {runtime}" + (f" ({provider})" if provider else ""))


def render(report: dict[str, Any], console: Console) -> None:
    table = Table(title="edgewise fleet", title_justify="left")
    for name, justify in (
        ("node", "left"), ("status", "left"), ("model", "left"), ("class · runtime", "left"),
        ("p50 ms", "right"),
        ("p99 ms", "right"), ("frames/s", "right"), ("esc. rate", "right"),
        ("outbox rows", "right"), ("evictions", "right"), ("last seen", "right"),
    ):  # fmt: skip
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in report["nodes"]:
        state = row["state"] or "?"
        status = f"[{_STATE_STYLE.get(state, 'white')}]{escape(state)}[/]"
        if row["reasons"]:
            status += " " + escape(", ".join(row["reasons"]))
        model = "-" if row["model"] is None else escape(str(row["model"]))
        if row["release"] is not None:
            model += f"@{row['release']}"
        evictions = "-" if row["evictions"] is None else str(row["evictions"])
        if row["evictions_by_kind"] and row["evictions"]:
            kinds = ", ".join(f"{k} {v}" for k, v in row["evictions_by_kind"].items() if v)
            evictions += f" ({escape(kinds)})"
        rate = row["escalation_rate"]
        table.add_row(
            escape(row["node"]),
            status,
            model,
            _serving(row),
            _ms(row["p50_ms"]),
            _ms(row["p99_ms"]),
            _num(row["frames_per_s"]),
            "-" if rate is None else f"{100 * rate:.1f} %",
            _num(row["outbox_rows"], "{:d}"),
            evictions,
            _age(row["last_seen_s"]),
        )
    console.print(table)
    fleet = report["fleet"]
    console.print(
        f"[bold]fleet[/]: {fleet['nodes']} nodes ({fleet['nodes_with_telemetry']} with "
        f"telemetry), p50 {_ms(fleet['p50_ms'])} ms, p99 {_ms(fleet['p99_ms'])} ms "
        f"(merged sketches, {fleet['latency_count']} latencies), "
        f"{_num(fleet['frames_per_s'])} frames/s"
    )
    if report["malformed"]:
        reasons = ", ".join(f"{k} x{v}" for k, v in report["malformed_by_reason"].items())
        console.print(
            f"[yellow]malformed messages ignored: {report['malformed']}[/] ({escape(reasons)})"
        )
    if report["stale_windows"]:
        console.print(
            f"[dim]{report['stale_windows']} older telemetry windows (a forwarded backlog) "
            "did not replace newer ones[/]"
        )


@fleet_app.command("status")
def status(
    broker: BrokerOpt = DEFAULT_BROKER,
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    tls_ca: TlsCaOpt = None,
    duration: Annotated[
        float,
        typer.Option(
            "--duration",
            "-d",
            min=0.1,
            help="Seconds to listen: a bit more than the nodes' telemetry window (10 s).",
        ),
    ] = 12.0,
    edge_root: EdgeRootOpt = "edge",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Listen to every node's status and telemetry, then print a table of nodes (status,
    model, p50/p99, frames/s, escalation rate, outbox, evictions, last seen) and the
    fleet-wide p50/p99 from the merged latency sketches.

    Nodes that published no telemetry while listening show their retained status only.
    Malformed messages are counted in a footer. Exits 2 with one line saying why if the broker
    cannot be reached or refuses the credentials or a subscription.
    """
    from schemas import ContractError, Topics

    conn = broker_settings(broker, username, password_file, tls_ca)
    try:
        topics = Topics(edge_root=edge_root)
    except ContractError as exc:
        fail(f"--edge-root: {exc}")
    view = run(listen(conn, duration_s=duration, topics=topics, console=None if as_json else _err))
    report = view.report(time.time())
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        render(report, Console())


@fleet_app.command("exporter")
def exporter(
    broker: BrokerOpt = DEFAULT_BROKER,
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    tls_ca: TlsCaOpt = None,
    listen: Annotated[
        str,
        typer.Option(
            "--listen",
            help="HOST:PORT of the /metrics endpoint Prometheus scrapes (port 0: any free one).",
        ),
    ] = "0.0.0.0:9873",
    edge_root: EdgeRootOpt = "edge",
    cloud_root: CloudRootOpt = "cloud",
    bridge_root: BridgeRootOpt = "bridges",
    max_age: Annotated[
        float,
        typer.Option(
            "--max-age",
            min=1.0,
            help="The latency quantiles (per node and fleet-wide) cover the telemetry windows "
            "received in the last this many seconds.",
        ),
    ] = 60.0,
    client_id: Annotated[
        str,
        typer.Option(
            "--client-id",
            help="The exporter's MQTT client id (prefixed USERNAME: when it logs in); give "
            "each exporter of one broker its own.",
        ),
    ] = "edgewise-exporter",
    log_format: logs.LogFormatOpt = None,
) -> None:
    """Serve the fleet as Prometheus metrics: every node's, worker's and bridge's status,
    telemetry and update events, from the broker, on http://HOST:PORT/metrics.

    Counters are the sums of the nodes' telemetry windows (each window counted once);
    quantiles come from merged latency sketches, so the fleet p99 is right. Metric names and
    labels: docs/observability.md. Runs until Ctrl-C or SIGTERM; while the broker is away it
    keeps retrying and serves edgewise_exporter_connected 0.
    """
    from edgewise.cli.exporter import FleetMetrics
    from schemas import ContractError, Topics

    logs.check_format(log_format)
    conn = broker_settings(broker, username, password_file, tls_ca)
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        fail(f"--listen: {listen!r} is not HOST:PORT (e.g. 0.0.0.0:9873)")
    try:
        fleet = FleetMetrics(
            topics=Topics(edge_root=edge_root, cloud_root=cloud_root), max_age_s=max_age
        )
        from schemas import validate_topic

        fleet.bridge_root = validate_topic(bridge_root)
    except ContractError as exc:
        fail(f"topic roots: {exc}")
    logs.setup("INFO", log_format, service="exporter", service_id=client_id)
    run(_serve(conn, fleet, host or "0.0.0.0", int(port_text), client_id))


async def _serve(conn: Broker, fleet: Any, host: str, port: int, client_id: str) -> None:
    import signal

    from edgewise.cli.exporter.service import Exporter

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        exp = Exporter(conn.mqtt, host=host, port=port, fleet=fleet, client_id=client_id)
        async with exp:
            _err.print(
                f"serving http://{host}:{exp.port}/metrics for the fleet on {conn.who} "
                f"(client id {exp.client_id}); Ctrl-C stops",
                soft_wrap=True,
                markup=False,
                highlight=False,
            )
            await stop.wait()
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")


@fleet_app.command("forget")
def forget(
    names: Annotated[list[str], typer.Argument(help="Node ids (or worker / bridge ids).")],
    broker: BrokerOpt = DEFAULT_BROKER,
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    tls_ca: TlsCaOpt = None,
    kind: Annotated[
        str,
        typer.Option("--kind", help="What NAMES are: node, worker or bridge."),
    ] = "node",
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Forget a source whose retained status says it is still running."
        ),
    ] = False,
    edge_root: EdgeRootOpt = "edge",
    cloud_root: CloudRootOpt = "cloud",
    bridge_root: BridgeRootOpt = "bridges",
) -> None:
    """Remove decommissioned nodes (or workers, bridges) from the fleet: clear every retained
    message under their topics (status, update events), so `fleet status` and the exporter
    drop them.

    Refuses a source whose retained status says online or degraded (it would publish again),
    unless --force.
    """
    from edgewise.cli.retained import collect_retained, publish_retained
    from schemas import ContractError, decode_status, validate_level

    roots = {"node": edge_root, "worker": f"{cloud_root}/workers", "bridge": bridge_root}
    if kind not in roots:
        fail(f"--kind: {kind!r} is not one of node, worker, bridge")
    try:
        for name in names:
            validate_level(name)
    except ContractError as exc:
        fail(f"{kind} id: {exc}")
    conn = broker_settings(broker, username, password_file, tls_ca)
    filters = [f"{roots[kind]}/{name}/#" for name in names]
    retained = collect_retained(conn, filters, settle_s=1.0)
    for name in names:
        status = retained.get(f"{roots[kind]}/{name}/status")
        if status is None or force:
            continue
        try:
            state = decode_status(status).state
        except ContractError:
            continue  # unreadable: nothing says it runs
        if state != "offline":
            fail(
                f"{kind} {name} says it is {state}: stop it first (it would publish its status "
                "again), or use --force"
            )
    if not retained:
        fail(f"nothing retained under {', '.join(filters)} on {conn.who}: no such {kind}?", 1)
    publish_retained(conn, [(topic, b"") for topic in sorted(retained)])
    typer.echo(
        f"forgot {len(names)} {kind}{'' if len(names) == 1 else 's'}: cleared "
        f"{len(retained)} retained message{'' if len(retained) == 1 else 's'}"
    )
