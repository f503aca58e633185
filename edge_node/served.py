"""The served model: what the node answers with, on its one inference thread.

The model is swapped (a new release) or reloaded into a fresh session (a recycle) between two
batches: the thread runs one call at a time in order, so the old model is closed only after
every call handed to it has finished.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edge_node.config import ModelConfig
from edge_node.hardware import NodeHardware, load_model
from edge_node.inference import AdaptiveRunner
from edgewise.serving.model import Prediction, ServedModel

log = logging.getLogger(__name__)


class ServedSlot:
    """Holds the served model and runs it; ``infer`` is what every batch goes through."""

    def __init__(self, model: ServedModel | None = None) -> None:
        self.loaded = model
        """The model, or None until the node has loaded it (on entering its context)."""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._runner: AdaptiveRunner[np.ndarray, Prediction] | None = None

    @property
    def model(self) -> ServedModel:
        assert self.loaded is not None, "the node's model is loaded on entering the context"
        return self.loaded

    async def load(
        self,
        hardware: NodeHardware,
        configured: ModelConfig,
        boot: Callable[[], ServedModel | None] | None,
    ) -> ServedModel:
        """Serve the model given at construction, else what the updater's ``boot`` activates
        (it recovers from what a crash interrupted, in a thread), else the configured file."""
        model = self.loaded
        if model is None and boot is not None:
            model = await asyncio.to_thread(boot)
        if model is None:
            model = load_model(
                hardware,
                configured.resolved_path(),
                name=configured.name,
                release=configured.release,
                output=configured.output,
            )
        self.serve(model)
        return model

    def serve(self, model: ServedModel) -> ServedModel | None:
        """Serve ``model`` from the next batch on; return the one served before, if any."""
        old = self.loaded
        self.loaded = model
        self._runner = AdaptiveRunner(model.predict, self._pool)
        return old

    async def infer(self, inputs: np.ndarray) -> Prediction:
        assert self._runner is not None, "made with the model on entering the context"
        return await self._runner(inputs)

    async def reload(self, hardware: NodeHardware) -> ServedModel | None:
        """Load the served model into a fresh session and serve that; the old one is closed
        once the calls already handed to it have finished. None if there is nothing to reload
        or the reload failed (the old session then goes on serving)."""
        old = self.model
        if old.path is None:
            log.warning("the served model was not loaded from a file: nothing to recycle")
            return None
        try:
            new = await asyncio.to_thread(
                load_model,
                hardware,
                old.path,
                name=old.name,
                release=old.release,
                output=old.output,
            )
        except Exception as exc:  # keep serving with what works
            log.error("recycling the inference session failed, keeping the old one: %s", exc)
            return None
        self.serve(new)
        # The pool runs one call at a time in order: this runs after every call given to `old`.
        self._pool.submit(old.close)
        return new

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self.loaded is not None:
            self.loaded.close()
