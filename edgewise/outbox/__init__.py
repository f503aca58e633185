"""The durable, bounded SQLite queue every edgewise service publishes through.

A record leaves only after its owner deletes it (after the broker's PUBACK); it survives
``kill -9`` and reboots; the file has a byte bound, and the outbox evicts by priority, counting
every eviction. :class:`Outbox` is synchronous (one thread); :class:`AsyncOutbox` runs one on a
dedicated thread with group commit; :class:`Forwarder` publishes what it holds through an
:class:`edgewise.mqtt.MqttSession` and deletes each record after the broker's PUBACK. Design
notes: :mod:`edgewise.outbox.store` (and the modules it names, one per promise),
docs/adr/0004-outbox.md. Exceptions live in
:mod:`edgewise.outbox.errors`
(tree in its docstring).
"""

from edgewise.outbox.async_outbox import AsyncOutbox
from edgewise.outbox.config import OutboxConfig
from edgewise.outbox.counters import OutboxStats
from edgewise.outbox.errors import OutboxCorrupt, OutboxError, StorageFull
from edgewise.outbox.forwarder import Confirmation, Forwarder, ForwarderStats
from edgewise.outbox.record import Kind, Record, Stored
from edgewise.outbox.sizing import ROW_OVERHEAD, budget_for, record_cost
from edgewise.outbox.store import Outbox

__all__ = [
    "ROW_OVERHEAD",
    "AsyncOutbox",
    "Confirmation",
    "Forwarder",
    "ForwarderStats",
    "Kind",
    "Outbox",
    "OutboxConfig",
    "OutboxCorrupt",
    "OutboxError",
    "OutboxStats",
    "Record",
    "StorageFull",
    "Stored",
    "budget_for",
    "record_cost",
]
