"""The Coral Edge TPU as a LiteRT delegate (provider ``"edgetpu"`` of :mod:`.litert`).

The delegate is Google's ``libedgetpu`` (``libedgetpu.so.1`` on Linux), installed from Coral's
Debian repository, not from PyPI (see docs/runtimes.md). It is opened with the interpreter
module's own ``load_delegate``. Google's ``pycoral`` is not needed; when ``pycoral.utils.edgetpu``
is importable it is used only to list the Edge TPUs it sees, to make a failure message precise.
(The PyPI package named ``pycoral`` is an unrelated project and is never imported by name alone.)

Nothing here raises: :func:`open_delegate` returns the delegate or the reason there is none, so
the caller can fall back to the next provider and report why.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EDGETPU_CUSTOM_OP = "edgetpu-custom-op"
"""The custom operator ``edgetpu_compiler`` puts in a model; only the delegate can run it."""

_LIBRARIES = {"Linux": "libedgetpu.so.1", "Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"}
_ENTRY_POINT = "tflite_plugin_create_delegate"


def default_library() -> str:
    """The delegate's file name on this platform (found through the dynamic loader's path)."""
    return _LIBRARIES.get(platform.system(), _LIBRARIES["Linux"])


@dataclass(frozen=True, slots=True)
class DelegateResult:
    """Either ``delegate`` (an opened delegate) or ``reason`` (why there is none)."""

    delegate: Any | None
    reason: str | None


def open_delegate(
    load_delegate: Callable[..., Any], library: str | None = None, device: str | None = None
) -> DelegateResult:
    """Open the Edge TPU delegate with the interpreter module's ``load_delegate``.

    ``library`` defaults to :func:`default_library`; ``device`` (e.g. ``"usb:0"``, ``"pci"``)
    picks one Edge TPU when several are attached (default: the first one found).
    """
    lib = library or default_library()
    problem = _not_a_delegate(lib)
    if problem is not None:
        return DelegateResult(None, problem)
    options = {"device": device} if device else None
    try:
        delegate = load_delegate(lib, options)
    except Exception as exc:  # the delegate's own failure (usually: no Edge TPU attached)
        seen = _devices_seen()
        hint = f"; Edge TPUs seen by pycoral: {seen}" if seen is not None else ""
        return DelegateResult(
            None,
            f"{lib} loaded but opened no Edge TPU ({_oneline(exc)}); is the accelerator "
            f"plugged in and is the user in the plugdev group?{hint}",
        )
    return DelegateResult(delegate, None)


def _not_a_delegate(lib: str) -> str | None:
    """Why ``lib`` cannot be a delegate library, checked before the interpreter's loader touches
    it (whose wrapper leaves noise on stderr when the library is unusable)."""
    try:
        handle = ctypes.CDLL(lib)
    except OSError as exc:
        if "No such file" in str(exc) or "cannot open" in str(exc):
            return (
                f"the Edge TPU delegate {lib} is not installed (apt-get install "
                "libedgetpu1-std from Coral's Debian repository; see docs/runtimes.md)"
            )
        return f"{lib} is not a loadable shared library: {_oneline(exc)}"
    if not hasattr(handle, _ENTRY_POINT):
        return f"{lib} is a shared library but not a TFLite delegate (no {_ENTRY_POINT})"
    return None


def _devices_seen() -> str | None:
    """The Edge TPUs Google's pycoral lists, if Google's pycoral is importable; else None."""
    try:
        from pycoral.utils import edgetpu  # Google's pycoral, from Coral's repository
    except ImportError:
        return None
    try:
        found = edgetpu.list_edge_tpus()
    except Exception as exc:  # diagnostics only: never let them fail the fallback
        return f"none listed ({_oneline(exc)})"
    return ", ".join(f"{d.get('type', '?')}:{d.get('path', '?')}" for d in found) or "none"


def _oneline(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
