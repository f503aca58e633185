"""Where a profiled process spent its samples: py-spy's collapsed stacks, summed by part.

``py-spy record --format raw`` writes one line per distinct stack: frames from the root to the
leaf joined by ``;``, each ``function (file:line)``, then a space and the number of samples.
:func:`summarize` charges each sample to the innermost frame that a :data:`PARTS` rule claims
(so paho called by the node counts as MQTT, SQLite called by the outbox as the outbox), and
also counts samples by leaf function.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

PARTS: tuple[tuple[str, str], ...] = (
    ("inference (onnxruntime)", "onnxruntime/"),
    ("inference (runtime wrapper)", "edgewise/serving/runtime/"),
    ("MQTT (paho)", "paho/"),
    ("outbox (SQLite)", "outbox/"),
    ("frame decode and checks", "schemas/"),
    ("telemetry", "telemetry/"),
    ("MQTT session", "edgewise/mqtt/"),
    ("node", "edge_node/"),
)
"""(part, path fragment) rules; a frame belongs to the first rule whose fragment its file has."""

OTHER = "other"
IDLE = "idle (waiting)"

IDLE_LEAVES: tuple[tuple[str, str], ...] = (
    ("_worker", "concurrent/futures/thread.py"),
    ("select", "selectors.py"),
    ("wait", "threading.py"),
    ("_wait_for_tstate_lock", "threading.py"),
)
"""(function, file) of leaf frames that mean a thread is blocked, not working: a pool worker
waiting for work, an event loop in epoll, a thread on a condition. py-spy leaves out idle
threads only where it can tell them apart, which it did not in our containers."""

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True, slots=True)
class Frame:
    function: str
    file: str

    def describe(self) -> str:
        return f"{self.function} ({self.file})"


def parse_frame(text: str) -> Frame:
    """``run (edgewise/serving/runtime/onnx.py:170)``
    -> Frame("run", "edgewise/serving/runtime/onnx.py")."""
    m = _FRAME.match(text.strip())
    if m is None:
        return Frame(text.strip(), "")
    return Frame(m.group("func"), m.group("file"))


def part_of(frame: Frame, parts: tuple[tuple[str, str], ...] = PARTS) -> str | None:
    return next((name for name, fragment in parts if fragment in frame.file), None)


def is_idle(leaf: Frame) -> bool:
    """Whether a sample whose innermost frame is ``leaf`` is a thread waiting (see IDLE_LEAVES)."""
    return any(
        leaf.file.endswith(file) and (leaf.function == fn or leaf.function.endswith("." + fn))
        for fn, file in IDLE_LEAVES
    )


@dataclass(slots=True)
class Summary:
    samples: int = 0
    by_part: Counter[str] = field(default_factory=Counter)
    by_leaf: Counter[str] = field(default_factory=Counter)
    skipped_lines: int = 0

    @property
    def busy(self) -> int:
        """Samples of threads at work (not :data:`IDLE`)."""
        return self.samples - self.by_part[IDLE]

    def share(self, part: str) -> float:
        """Share of the busy samples (0 for the idle part)."""
        return self.by_part[part] / self.busy if self.busy and part != IDLE else 0.0


def summarize(lines: Iterable[str], parts: tuple[tuple[str, str], ...] = PARTS) -> Summary:
    """Sum collapsed-stack lines by part (innermost claimed frame, or :data:`IDLE` for a waiting
    thread) and by leaf function (busy samples only)."""
    out = Summary()
    for raw in lines:
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            out.skipped_lines += 1
            continue
        count = int(count_text)
        frames = [parse_frame(f) for f in stack.split(";")]
        out.samples += count
        if is_idle(frames[-1]):
            out.by_part[IDLE] += count
            continue
        part = next(
            (p for p in (part_of(f, parts) for f in reversed(frames)) if p is not None), OTHER
        )
        out.by_part[part] += count
        out.by_leaf[frames[-1].describe()] += count
    return out


__all__ = [
    "IDLE",
    "IDLE_LEAVES",
    "OTHER",
    "PARTS",
    "Frame",
    "Summary",
    "is_idle",
    "parse_frame",
    "part_of",
    "summarize",
]
