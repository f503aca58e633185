"""The demo's live view: what the viewer sees on the broker, and the table it makes of it.

:class:`DemoWatch` takes every message the demo's viewer session receives (results, the node's
status and update events, escalations and replies) into a :class:`DemoReport`; :func:`table`
shows the report, live while the demo runs and as the closing summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from rich.table import Table

from edgewise.mqtt import Inbound
from edgewise.releases import ReleaseError, decode_event
from schemas import (
    ContractError,
    Topics,
    decode_escalations,
    decode_replies,
    decode_results,
    decode_status,
)


@dataclass(slots=True)
class DemoReport:
    broker: str = ""
    sent: int = 0
    answered: set[int] = field(default_factory=set)
    correct: int = 0
    duplicates: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    rejected: int = 0
    batches: int = 0
    elapsed_s: float = 0.0
    model: str = ""
    cloud: bool = True
    edge_correct: int = 0
    sources: Counter[str] = field(default_factory=Counter)
    escalated_at: dict[str, float] = field(default_factory=dict)
    round_trips_ms: list[float] = field(default_factory=list)
    update: bool = True
    update_release: int | None = None
    update_steps: list[tuple[float, str]] = field(default_factory=list)
    """(seconds since the sensor started, event kind[:reason]) of the node's update events."""
    by_release: Counter[int] = field(default_factory=Counter)
    result_times: list[float] = field(default_factory=list)
    """When each results message arrived (monotonic): the gaps while the model was swapped."""
    inference_errors: int = 0
    update_topics: list[str] = field(default_factory=list)
    """Where the update was published retained (cleared again at the end of the run)."""
    interrupted: bool = False
    """Stopped early (Ctrl-C, ``stop``): the summary is of the run so far."""

    @property
    def results(self) -> int:
        return len(self.answered)

    @property
    def accuracy(self) -> float:
        return self.correct / self.results if self.results else 0.0

    def quantile_ms(self, q: float) -> float:
        return float(np.quantile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def edge_accuracy(self) -> float:
        return self.edge_correct / self.results if self.results else 0.0

    @property
    def escalation_rate(self) -> float:
        return 1.0 - self.sources["edge"] / self.results if self.results else 0.0

    def round_trip_ms(self, q: float) -> float:
        rt = self.round_trips_ms
        return float(np.quantile(rt, q)) if rt else float("nan")

    @property
    def update_outcome(self) -> str:
        """The last step the update reached (``committed`` when it rolled out)."""
        return self.update_steps[-1][1] if self.update_steps else "not started"

    def update_gap_ms(self, start: float) -> float:
        """The largest gap between results messages from the first update event (``start`` is
        the monotonic time the sensor started) to one second after the last one."""
        if not self.update_steps:
            return float("nan")
        lo = start + self.update_steps[0][0]
        hi = start + self.update_steps[-1][0] + 1.0
        times = [t for t in self.result_times if lo <= t <= hi]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        return max(gaps) * 1000.0 if gaps else float("nan")


def table(report: DemoReport, *, title: str, elapsed_s: float, start: float | None = None) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    rate = report.results / elapsed_s if elapsed_s > 0 else 0.0
    t.add_row("broker", report.broker)
    t.add_row("model at start", report.model)
    t.add_row("frames sent", f"{report.sent:,}")
    t.add_row("results received", f"{report.results:,}")
    t.add_row("results/s", f"{rate:,.0f}")
    t.add_row(
        "latency p50 / p99", f"{report.quantile_ms(0.5):.2f} / {report.quantile_ms(0.99):.2f} ms"
    )
    t.add_row("accuracy so far", f"{report.accuracy:.1%}")
    if report.cloud:
        t.add_row("edge-only accuracy", f"{report.edge_accuracy:.1%}")
        t.add_row("hybrid accuracy", f"{report.accuracy:.1%}")
        t.add_row("escalation rate", f"{report.escalation_rate:.1%}")
        t.add_row(
            "escalation round trip p50 / p99",
            f"{report.round_trip_ms(0.5):.2f} / {report.round_trip_ms(0.99):.2f} ms",
        )
        t.add_row("sources", ", ".join(f"{k} {v:,}" for k, v in sorted(report.sources.items())))
    if report.update:
        steps = " → ".join(k for _, k in report.update_steps) or "waiting"
        t.add_row(f"model update to r{report.update_release}", steps)
        t.add_row(
            "results by release",
            ", ".join(f"r{k} {v:,}" for k, v in sorted(report.by_release.items())),
        )
        if start is not None and report.update_steps:
            took = report.update_steps[-1][0] - report.update_steps[0][0]
            t.add_row("update took", f"{took:.1f} s, {report.inference_errors} failed inferences")
            t.add_row("largest result gap during it", f"{report.update_gap_ms(start):.0f} ms")
    t.add_row("rejected frames", f"{report.rejected:,}")
    return t


class DemoWatch:
    """Fills ``report`` from the viewer's messages; ``online`` is set when the node says so."""

    def __init__(
        self, report: DemoReport, *, topics: Topics, node_id: str, edge_labels: np.ndarray
    ) -> None:
        self.report = report
        self.topics = topics
        self.node_id = node_id
        self.edge_labels = edge_labels
        self.labels: dict[int, int] = {}
        """The true label of each frame sent, by sequence number."""
        self.online = asyncio.Event()
        self.start = time.monotonic()
        """When the sensor started (monotonic): update steps are timed from it."""

    def on_sent(self, seq: int, label: int) -> None:
        self.labels[seq] = label
        self.report.sent += 1

    def on_message(self, msg: Inbound) -> None:
        report, topics, node_id = self.report, self.topics, self.node_id
        labels, edge_labels = self.labels, self.edge_labels
        if msg.topic == topics.events(node_id):
            with contextlib.suppress(ReleaseError):
                e = decode_event(msg.payload)
                if not msg.retain and e.release == report.update_release:
                    kind = e.kind if e.reason is None else f"{e.kind}:{e.reason}"
                    report.update_steps.append((time.monotonic() - self.start, kind))
            return
        if msg.topic.startswith(f"{topics.cloud_root}/escalations/"):
            with contextlib.suppress(ContractError):
                for case in decode_escalations(msg.payload).cases:
                    report.escalated_at.setdefault(case.id, msg.received_at)
            return
        if msg.topic == topics.reply(node_id):
            with contextlib.suppress(ContractError):
                for verdict in decode_replies(msg.payload).verdicts:
                    sent_at = report.escalated_at.pop(verdict.id, None)
                    if sent_at is not None:
                        report.round_trips_ms.append((msg.received_at - sent_at) * 1000.0)
            return
        if msg.topic == topics.status(node_id):
            with contextlib.suppress(ContractError):
                if decode_status(msg.payload).state == "online":
                    self.online.set()
            return
        try:
            batch = decode_results(msg.payload)
        except ContractError:
            return
        now = time.time()
        report.result_times.append(time.monotonic())
        for r in batch.results:
            if r.frame_seq in report.answered:
                report.duplicates += 1
                continue
            report.answered.add(r.frame_seq)
            report.sources[r.source] += 1
            report.by_release[r.release] += 1
            if labels.get(r.frame_seq) == r.label:
                report.correct += 1
            if labels.get(r.frame_seq) == edge_labels[r.frame_seq % len(edge_labels)]:
                report.edge_correct += 1
            if r.frame_ts is not None:
                report.latencies_ms.append((now - r.frame_ts) * 1000.0)
