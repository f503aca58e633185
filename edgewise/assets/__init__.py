"""Files shipped with edgewise: the bundled digits models and held-out frames. Only the command
line reads them (the services are given their model paths: docs/adr/0001-layout.md)."""

from __future__ import annotations

from pathlib import Path


def bundled_asset(name: str) -> Path:
    """Path of a file shipped in ``edgewise/assets`` (the demo models and held-out frames)."""
    return Path(__file__).parent / name
