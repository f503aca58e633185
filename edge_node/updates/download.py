"""Fetch an artifact from its retained, content-addressed chunks ``models/{sha256}/{i}``.

Each chunk must have exactly the size the manifest implies; an index past the last one or a
chunk longer than declared is ``size_exceeded`` (so endless data stops at the declared size),
a shorter one ``hash_mismatch``. Chunks are kept in ``partial/{sha}/`` as they arrive, so a
download resumes after a disconnect (the session re-subscribes and the broker resends the
retained chunks) and after a restart. Once every chunk is there they are joined into
``staged/{sha}.{format}`` through a temp file whose SHA-256 is checked before the rename: nothing
else reads the artifact before its hash matched.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from edge_node.updates.errors import StepFailed
from edgewise.files import atomic_file, write_atomic
from edgewise.mqtt import Conflict, Inbound, MqttConfig, MqttSession, max_packet_for
from edgewise.releases import Manifest, Reason
from schemas import Topics

log = logging.getLogger(__name__)


class ChunkDownload:
    def __init__(
        self,
        manifest: Manifest,
        *,
        mqtt: MqttConfig,
        topics: Topics,
        client_id: str,
        partial_root: Path,
        staged: Path,
        on_garbage: Callable[[str, bytes, str], object] | None = None,
        conflict: Conflict | None = None,
    ) -> None:
        """``on_garbage(topic, payload, detail)`` hears of messages that are no chunk;
        ``conflict``: the node's takeover count, shared by its connections (ADR 0073)."""
        self.manifest = manifest
        self._conflict = conflict
        self._on_garbage = on_garbage
        self._mqtt = mqtt
        self._topics = topics
        self._client_id = client_id
        self._dir = partial_root / manifest.sha256
        self._staged = staged
        self._prefix = topics.model_chunk(manifest.sha256, 0)[:-1]
        self._queue: asyncio.Queue[Inbound] = asyncio.Queue()
        self.received_bytes = 0

    def _have(self) -> set[int]:
        return {int(p.name) for p in self._dir.iterdir() if p.name.isdigit()}

    async def fetch(self, timeout_s: float) -> Path:
        """The staged, hash-verified artifact; raises :class:`StepFailed`."""
        m = self.manifest
        if self._staged.exists() and await asyncio.to_thread(_sha256, self._staged) == m.sha256:
            return self._staged
        self._dir.mkdir(parents=True, exist_ok=True)
        have = await asyncio.to_thread(self._have)
        if len(have) < m.chunks:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._receive(have)
            except TimeoutError:
                raise StepFailed(
                    Reason.DOWNLOAD_TIMEOUT,
                    f"{len(self._have())} of {m.chunks} chunks after {timeout_s:.0f} s",
                ) from None
        return await asyncio.to_thread(self._join)

    async def _receive(self, have: set[int]) -> None:
        m = self.manifest
        async with MqttSession(
            self._mqtt,
            client_id=self._client_id,
            on_message=self._queue.put_nowait,
            manual_ack=False,
            persistent=False,
            conflict=self._conflict,
            max_packet_bytes=max_packet_for(m.chunk_bytes),  # nothing larger than a chunk
        ) as session:
            session.subscribe(f"{self._prefix}+", qos=1)
            while len(have) < m.chunks:
                msg = await self._queue.get()
                index = self._index(msg)
                if index is None or index in have:
                    continue
                await asyncio.to_thread(write_atomic, self._dir / str(index), msg.payload)
                self.received_bytes += len(msg.payload)
                have.add(index)

    def _index(self, msg: Inbound) -> int | None:
        m = self.manifest
        tail = msg.topic[len(self._prefix) :]
        if not msg.topic.startswith(self._prefix) or not (tail.isascii() and tail.isdigit()):
            if self._on_garbage is not None:
                self._on_garbage(msg.topic, msg.payload, "the topic's last level is no index")
            return None
        if not msg.payload:
            return None  # an empty retained message is a cleared chunk: ignore it
        index = int(tail)
        if index >= m.chunks:
            raise StepFailed(
                Reason.SIZE_EXCEEDED, f"chunk {index} beyond the declared {m.chunks} ({m.size} B)"
            )
        want = m.chunk_size(index)
        if len(msg.payload) > want:
            raise StepFailed(
                Reason.SIZE_EXCEEDED, f"chunk {index} has {len(msg.payload)} bytes, at most {want}"
            )
        if len(msg.payload) < want:
            raise StepFailed(
                Reason.HASH_MISMATCH, f"chunk {index} has {len(msg.payload)} bytes, not {want}"
            )
        return index

    def _join(self) -> Path:
        m = self.manifest
        digest = hashlib.sha256()
        total = 0
        with atomic_file(self._staged) as out:  # renamed into place only if the hash matches
            for i in range(m.chunks):
                data = (self._dir / str(i)).read_bytes()
                total += len(data)
                if total > m.size:
                    raise StepFailed(Reason.SIZE_EXCEEDED, f"more than {m.size} bytes")
                digest.update(data)
                out.write(data)
            if digest.hexdigest() != m.sha256 or total != m.size:
                self.discard()
                raise StepFailed(
                    Reason.HASH_MISMATCH,
                    f"the chunks hash to {digest.hexdigest()[:16]}…, the manifest says "
                    f"{m.sha256[:16]}…",
                )
        self.discard()
        return self._staged

    def discard(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


def _sha256(path: Path) -> str:
    from edge_node.updates.files import sha256_file

    return sha256_file(path)
