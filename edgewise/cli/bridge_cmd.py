"""``edgewise bridge``: forward between a site broker and a cloud broker (docs/bridge.md)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from edgewise.cli import logs

err = Console(stderr=True)


def bridge(
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            "-c",
            help="Bridge config (TOML): brokers, rules, queues. See docs/bridge.md.",
        ),
    ],
    log_format: logs.LogFormatOpt = None,
) -> None:
    """Run the site-to-cloud bridge: durable queues both ways, retained state kept, no echoes.

    Settings come from --config, then EDGEWISE_* environment variables (nested keys joined with
    `__`, e.g. EDGEWISE_CLOUD_BROKER__PASSWORD). Credentials: `password_file` in the config or
    the environment, never a flag. SIGTERM drains the queues (up to drain_timeout_s) and exits 0.
    """
    from broker_bridge import BridgeConfig, BridgeError, run_bridge

    logs.check_format(log_format)
    try:
        cfg = BridgeConfig.load(config)
    except BridgeError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    logs.setup(cfg.log_level, log_format, service="bridge", service_id=cfg.bridge_id)
    try:
        code = asyncio.run(run_bridge(cfg))
    except BridgeError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)
