"""CPU per case of one cloud worker, per thread: ``python -m bench.worker_cpu``.

Starts Mosquitto and one ``edgewise worker`` (as bench/escalation.py does), warms it up with
2,000 cases, then publishes ``--count`` cases in messages of ``--cases`` as fast as one client
can and reads, from ``/proc``, the CPU time each of the worker's threads used meanwhile (and the
broker's, this client's and the whole machine's). CPU per case is less sensitive to other work
on a shared machine than cases per second. Linux only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.escalation import start_worker, stop_workers, throughput
from edgewise.local_broker import MosquittoProcess

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Thread id -> (name, user + system CPU seconds) of process ``pid``."""
    out: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine so far."""
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


@dataclass
class Marks:
    """The counters read just before the first publish."""

    threads: dict[int, tuple[str, float]] = field(default_factory=dict)
    broker: float = 0.0
    client: float = 0.0
    machine: tuple[int, int] = (0, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=40_000, help="cases in the measured run")
    parser.add_argument("--cases", type=int, default=64, help="cases per message")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp_s:
        tmp = Path(tmp_s)
        broker = MosquittoProcess(tmp / "mosquitto")
        info = broker.start()
        try:
            worker = start_worker(info, tmp, "cpu-w0", "cpu")
            broker_pid = broker._proc.pid if broker._proc is not None else None

            def broker_cpu() -> float:
                return sum(c for _, c in thread_cpu(broker_pid).values()) if broker_pid else 0.0

            marks = Marks()

            def before() -> None:
                marks.threads = thread_cpu(worker.pid)
                marks.broker = broker_cpu()
                marks.client = time.process_time()
                marks.machine = machine_busy()

            try:
                asyncio.run(throughput(info, 2000, args.cases))  # warm-up
                rate = asyncio.run(throughput(info, args.count, args.cases, before))
                after, broker_used = thread_cpu(worker.pid), broker_cpu() - marks.broker
                client_used = time.process_time() - marks.client
                busy, total = machine_busy()
            finally:
                stop_workers([worker])
        finally:
            broker.stop()
    per = 1e6 / args.count
    print(f"cpus: {cpus}, load average: {os.getloadavg()[0]:.2f}")
    print(f"{args.count:,} cases in messages of {args.cases}: {rate:,.0f} cases/s")
    worker_used = 0.0
    for tid, (name, cpu) in sorted(after.items()):
        used = cpu - marks.threads.get(tid, (name, 0.0))[1]
        worker_used += used
        if used * per >= 0.05:
            role = "event loop" if tid == worker.pid else name
            print(f"  worker thread {tid} ({role}): {used * per:6.1f} µs/case")
    print(f"  worker, all threads: {worker_used * per:6.1f} µs/case")
    print(
        f"  broker: {broker_used * per:.1f} µs/case; this client: {client_used * per:.1f} µs/case"
    )
    share = (busy - marks.machine[0]) / max(1, total - marks.machine[1])
    print(f"  machine busy: {share * 100 * cpus:.0f} % of {100 * cpus} %")


if __name__ == "__main__":
    main()
