"""The ``edgewise`` command: one entry point for every part of the system."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console

from edgewise.cli import bridge_cmd as _bridge_cmd
from edgewise.cli import helptext as _helptext
from edgewise.cli import logs
from edgewise.cli.connect import (
    DEFAULT_BROKER,
    BrokerOpt,
    PasswordFileOpt,
    ServiceBrokerOpt,
    ServicePasswordFileOpt,
    ServiceTlsCaOpt,
    ServiceUsernameOpt,
    TlsCaOpt,
    UsernameOpt,
    broker_option,
    broker_settings,
    fail,
    service_mqtt,
)

app = typer.Typer(
    name="edgewise",
    help="ML inference at the edge over MQTT.\n\n"
    "Start with `edgewise demo`: a broker, an edge node and a simulated sensor on this machine.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    # Subcommands inherit the help options from the root's context.
    context_settings={"help_option_names": ["-h", "--help"]},
)
sensor_app = typer.Typer(help="Simulated sensors.", no_args_is_help=True)
app.add_typer(sensor_app, name="sensor")
from edgewise.cli.fleet_cmd import fleet_app  # noqa: E402

app.add_typer(fleet_app, name="fleet")
from edgewise.cli.worker_cmd import worker_app  # noqa: E402

app.add_typer(worker_app, name="worker")
app.command("bridge")(_bridge_cmd.bridge)

err = Console(stderr=True)
_fail = fail


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        Console().print(f"edgewise {version('edgewise')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    _: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            callback=_version,
            is_eager=True,
            help="Print the version of edgewise and exit.",
        ),
    ] = False,
) -> None:
    pass  # the help is the Typer's; this callback only carries --version


def _logging(level: str, service: str, service_id: str | None = None) -> None:
    """A command's logs (EDGEWISE_LOG_FORMAT picks the format, edgewise/cli/logs.py)."""
    logs.check_format(None)
    logs.setup(level, service=service, service_id=service_id)


@app.command()
def node(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Node config (TOML). See docs/configuration.md."),
    ] = None,
    broker: ServiceBrokerOpt = None,
    node_id: Annotated[str | None, typer.Option("--node-id", help="Override node_id.")] = None,
    username: ServiceUsernameOpt = None,
    password_file: ServicePasswordFileOpt = None,
    tls_ca: ServiceTlsCaOpt = None,
    log_format: logs.LogFormatOpt = None,
) -> None:
    """Run an edge node: subscribe to sensor frames, infer locally, publish results.

    Settings come from --config, then EDGEWISE_* environment variables (nested keys joined with
    `__`, e.g. EDGEWISE_MQTT__HOST), then these flags (--broker also from EDGEWISE_BROKER).
    SIGTERM drains in-flight frames and exits 0.
    An unreachable broker is retried (with backoff, the reason in the log) until it answers.
    """
    from edge_node.config import unknown_env_names
    from edge_node.errors import EdgeNodeError
    from edge_node.service import run_node
    from edgewise.cli.defaults import node_config

    overrides: dict[str, Any] = {}
    if node_id:
        overrides["node_id"] = node_id
    logs.check_format(log_format)
    try:
        cfg = node_config(config, **overrides)
        mqtt = service_mqtt(cfg.mqtt, broker, username, password_file, tls_ca)
        if mqtt is not cfg.mqtt:
            cfg = cfg.model_copy(update={"mqtt": mqtt})
        logs.setup(cfg.log_level, log_format, service="node", service_id=cfg.node_id)
        for name in unknown_env_names():
            logging.getLogger("edgewise").warning(
                "%s is set but no setting reads it (a typo?); see docs/configuration.md", name
            )
        code = asyncio.run(run_node(cfg))
    except EdgeNodeError as exc:
        _fail(str(exc))
    raise typer.Exit(code)


@app.command()
def demo(
    duration: Annotated[
        float, typer.Option("--duration", "-d", min=1, help="Seconds of sensor traffic.")
    ] = 15.0,
    rate: Annotated[float, typer.Option("--rate", "-r", min=1, help="Frames per second.")] = 200.0,
    broker: Annotated[
        str | None,
        broker_option(
            "Use this broker (mqtt://HOST[:PORT] or mqtts://HOST[:PORT]) instead of starting one;"
            " --username, --password-file and --tls-ca apply to it.",
        ),
    ] = None,
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    tls_ca: TlsCaOpt = None,
    update: Annotated[
        bool,
        typer.Option(
            "--update/--no-update",
            help="Roll out a signed release of the edge model a quarter of the way through.",
        ),
    ] = True,
) -> None:
    """Run a broker, an edge node, a cloud worker and a simulated sensor here, with a live view
    and a summary.

    Starts Mosquitto from the project's config when `mosquitto` is installed, else an embedded
    MQTT 3.1.1 broker. Exits 0 when every frame got its result (and, with --update, the signed
    update was committed); 2 with one line saying why if --broker cannot be reached.
    """
    import signal

    from edgewise.cli.connect import run
    from edgewise.cli.demo import run_demo
    from edgewise.cli.demo_view import DemoReport

    external = broker_settings(broker, username, password_file, tls_ca) if broker else None
    _logging("WARNING", "demo")
    console = Console()

    async def go() -> DemoReport:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_sigint() -> None:  # stop the sensor, wait for what is in flight, summarise
            stop.set()
            loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C stops at once

        loop.add_signal_handler(signal.SIGINT, on_sigint)
        try:
            return await run_demo(
                duration_s=duration,
                rate_hz=rate,
                broker=external,
                console=console,
                live=console.is_terminal,
                update=update,
                stop=stop,
            )
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    report = run(go())
    if report.interrupted:
        raise typer.Exit(130)
    if report.sent == 0 or report.results < report.sent:
        _fail(
            f"{report.sent - report.results} of {report.sent} frames got no result "
            "(see the log above)",
            1,
        )
    if update and report.update_outcome != "committed":
        _fail(f"the model update ended {report.update_outcome!r}, not committed", 1)


@sensor_app.command("simulate")
def sensor_simulate(
    broker: BrokerOpt = DEFAULT_BROKER,
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    tls_ca: TlsCaOpt = None,
    rate: Annotated[
        float, typer.Option("--rate", "-r", min=0.01, help="Frames per second.")
    ] = 10.0,
    count: Annotated[
        int | None, typer.Option("--count", "-n", min=1, help="Stop after N frames.")
    ] = None,
    duration: Annotated[
        float | None, typer.Option("--duration", "-d", min=0.1, help="Stop after S seconds.")
    ] = None,
    qos: Annotated[int, typer.Option("--qos", min=0, max=1, help="MQTT QoS of the frames.")] = 1,
    device: Annotated[str, typer.Option("--device", help="Device id (topic level).")] = "sim-1",
    sensor: Annotated[str, typer.Option("--sensor", help="Sensor name (topic level).")] = "digits",
    fmt: Annotated[str, typer.Option("--format", help="msgpack or json.")] = "msgpack",
    per_message: Annotated[
        int,
        typer.Option(
            "--frames-per-message",
            min=1,
            max=1024,
            help="Send frame batches of this many frames (1: one frame per message).",
        ),
    ] = 1,
) -> None:
    """Publish the bundled held-out digits frames to sensors/DEVICE/SENSOR at a steady rate.

    Names the broker at start; prints what it sent (acknowledged, failed) at the end, and on
    Ctrl-C (after waiting up to 10 s for the acknowledgements in flight; exit 130). Exits 2 with
    one line saying why if the broker cannot be reached or refuses the credentials; a connection
    lost later is re-made and unacknowledged frames are sent again."""
    import signal

    from edgewise.cli.connect import run, session
    from edgewise.cli.sensor import SimStats, sensor_client_id, simulate
    from schemas import Topics

    if fmt not in ("msgpack", "json"):
        _fail(f"--format must be msgpack or json, not {fmt!r}")
    conn = broker_settings(broker, username, password_file, tls_ca)
    _logging("WARNING", "sensor")
    kind: Literal["msgpack", "json"] = "json" if fmt == "json" else "msgpack"
    interrupted = False

    async def go() -> SimStats:
        nonlocal interrupted
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_sigint() -> None:
            nonlocal interrupted
            interrupted = True
            stop.set()
            loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C stops at once

        client_id = sensor_client_id(device, sensor)
        async with session(conn, purpose="sensor", client_id=client_id) as s:
            err.print(
                f"publishing to {Topics().sensor(device, sensor)} on {conn.who}"
                f" at {rate:g} frames/s (Ctrl-C stops)",
                soft_wrap=True,
                highlight=False,
                markup=False,
            )
            loop.add_signal_handler(signal.SIGINT, on_sigint)
            try:
                return await simulate(
                    s,
                    device=device,
                    sensor=sensor,
                    rate_hz=rate,
                    count=count,
                    duration_s=duration,
                    qos=qos,
                    fmt=kind,
                    per_message=per_message,
                    stop=stop,
                )
            finally:
                loop.remove_signal_handler(signal.SIGINT)

    stats = run(go())
    Console().print(
        f"sent {stats.sent} frames in {stats.elapsed_s:.1f} s "
        f"({stats.acked} acknowledged, {stats.failed} failed)"
        + (" — interrupted" if interrupted else ""),
        highlight=False,
    )
    raise typer.Exit(130 if interrupted else 0 if stats.failed == 0 else 1)


@app.command()
def watch(
    filters: Annotated[
        list[str] | None, typer.Argument(help="Topic filters (default: edge/#).")
    ] = None,
    broker: BrokerOpt = DEFAULT_BROKER,
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    tls_ca: TlsCaOpt = None,
    count: Annotated[
        int | None, typer.Option("--count", "-n", min=1, help="Exit after N messages.")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", "-t", min=0.1, help="Exit after S seconds.")
    ] = None,
    raw: Annotated[
        bool,
        typer.Option(
            "--raw", help="Show raw bytes instead of decoding (with --json: payload_base64)."
        ),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="One JSON object per message and line (ts, topic, qos, retain, size_bytes,"
            " payload; binary as base64), nothing truncated.",
        ),
    ] = False,
    rate: Annotated[
        bool,
        typer.Option(
            "--rate",
            help="Instead of the messages, print messages/s and bytes/s per topic filter every"
            " second (for busy topics; JSON lines with --json).",
        ),
    ] = False,
) -> None:
    """Subscribe and print decoded MessagePack/JSON messages (results, status, ...).

    Exits 0 (1 if --count was given and fewer came); 2 with one line saying why if the broker
    cannot be reached or refuses the credentials or a subscription."""
    from edgewise.cli.connect import run
    from edgewise.cli.watch import Mode
    from edgewise.cli.watch import watch as run_watch

    conn = broker_settings(broker, username, password_file, tls_ca)
    _logging("WARNING", "watch")
    mode: Mode = "rate" if rate else "json" if as_json else "pretty"
    seen = run(
        run_watch(
            conn,
            filters or ["edge/#"],
            count=count,
            timeout_s=timeout,
            raw=raw,
            console=Console(soft_wrap=True) if as_json else Console(),
            mode=mode,
            as_json=as_json,
        )
    )
    raise typer.Exit(0 if count is None or seen >= count else 1)


from edgewise.cli.cmd_cmd import cmd_app  # noqa: E402 - the subcommands import nothing from here
from edgewise.cli.keys_cmd import keys_app  # noqa: E402
from edgewise.cli.model_cmd import model_app  # noqa: E402
from edgewise.cli.quantize_cmd import check as _model_check  # noqa: E402
from edgewise.cli.quantize_cmd import quantize as _model_quantize  # noqa: E402

model_app.command("quantize")(_model_quantize)
model_app.command("check")(_model_check)

app.add_typer(keys_app, name="keys")
app.add_typer(model_app, name="model")
app.add_typer(cmd_app, name="cmd")
_helptext.reflow(app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
