"""What an MQTT session counts: connects, failures, read pauses, takeovers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SessionStats:
    connects: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    handler_errors: int = 0
    read_pauses: int = 0
    paused_keepalives: int = 0
    """seconds of paused reading in which the keep-alive was kept (bytes waited unread)"""
    read_wakeups: int = 0
    """readable events served (each reads every packet buffered, up to READS_PER_WAKEUP calls)"""
    takeovers: int = 0
    """connections another connection with our client id took over (edgewise.mqtt.takeover)"""
