"""``edgewise worker``: run a cloud worker, or export its hard examples."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from edgewise.cli import logs
from edgewise.cli.connect import (
    ServiceBrokerOpt,
    ServicePasswordFileOpt,
    ServiceTlsCaOpt,
    ServiceUsernameOpt,
    service_mqtt,
)

worker_app = typer.Typer(
    help="Cloud workers: answer escalated (unsure) edge cases with a bigger model.",
    invoke_without_command=True,
)
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Worker config (TOML). See docs/cloud-worker.md."),
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


@worker_app.callback()
def worker(
    ctx: typer.Context,
    config: ConfigOpt = None,
    broker: ServiceBrokerOpt = None,
    worker_id: Annotated[
        str | None, typer.Option("--worker-id", help="Override worker_id.")
    ] = None,
    username: ServiceUsernameOpt = None,
    password_file: ServicePasswordFileOpt = None,
    tls_ca: ServiceTlsCaOpt = None,
    log_format: logs.LogFormatOpt = None,
) -> None:
    """Run a cloud worker: shared subscription to escalations, batched inference, replies.

    Settings come from --config, then EDGEWISE_WORKER_* environment variables (nested keys
    joined with `__`), then these flags. SIGTERM finishes the escalations in hand and exits 0.
    A worker started before its broker waits for it (retrying with backoff, the reason in the
    log) and subscribes once it answers.
    """
    if ctx.invoked_subcommand is not None:
        return
    from cloud_worker import Worker, WorkerError, run_worker
    from edgewise.cli.defaults import worker_config

    logs.check_format(log_format)
    overrides: dict[str, object] = {}
    if worker_id:
        overrides["worker_id"] = worker_id
    try:
        cfg = worker_config(config, **overrides)
        mqtt = service_mqtt(cfg.mqtt, broker, username, password_file, tls_ca)
        if mqtt is not cfg.mqtt:
            cfg = cfg.model_copy(update={"mqtt": mqtt})
        logs.setup(cfg.log_level, log_format, service="worker", service_id=cfg.worker_id)
        code = asyncio.run(run_worker(Worker(cfg)))
    except WorkerError as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


@worker_app.command("export")
def export_cmd(
    out: Annotated[Path, typer.Argument(help="File to write (e.g. hard_examples.parquet).")],
    fmt: Annotated[
        Literal["parquet", "csv"], typer.Option("--format", "-f", help="parquet or csv.")
    ] = "parquet",
    store: Annotated[
        Path | None,
        typer.Option("--store", "-s", help="Store file; default: store.path of --config."),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Write every stored hard example (input, edge and cloud verdicts, node, models, times)."""
    from cloud_worker import WorkerConfig, WorkerError
    from cloud_worker.export import export

    try:
        path = store if store is not None else WorkerConfig.load(config).store.path
        with Progress(
            TextColumn("exporting"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        ) as progress:
            task = progress.add_task("export", total=None)
            n = export(
                path,
                out,
                fmt,
                on_total=lambda t: progress.update(task, total=t),
                on_rows=lambda k: progress.advance(task, k),
            )
    except WorkerError as exc:
        raise _fail(str(exc)) from None
    Console().print(f"wrote {n:,} hard examples from {path} to {out} ({fmt})")
