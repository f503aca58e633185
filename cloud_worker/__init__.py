"""Cloud workers: answer the edge's unsure cases with a bigger model, keep them as hard examples.

``edgewise worker --config worker.toml`` runs :class:`Worker` with an ONNX Runtime model per
configured model name; :meth:`Worker.handler` registers your own typed function instead. See
docs/cloud-worker.md, docs/adr/0030-escalation.md and docs/adr/0032-escalation-batches.md.
Exceptions live in :mod:`cloud_worker.errors` (tree in its docstring).
"""

from cloud_worker.config import WorkerConfig
from cloud_worker.errors import ConfigError, ExportError, HandlerError, StoreError, WorkerError
from cloud_worker.handler import Batch, Handler, Verdict, Verdicts
from cloud_worker.service import run_worker
from cloud_worker.stats import WorkerStats
from cloud_worker.store import Answer, HardExampleStore
from cloud_worker.worker import Worker

__all__ = [
    "Answer",
    "Batch",
    "ConfigError",
    "ExportError",
    "Handler",
    "HandlerError",
    "HardExampleStore",
    "StoreError",
    "Verdict",
    "Verdicts",
    "Worker",
    "WorkerConfig",
    "WorkerError",
    "WorkerStats",
    "run_worker",
]
