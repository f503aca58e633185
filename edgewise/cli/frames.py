"""The bundled held-out digits frames (8x8 images scaled to [0, 1], with their labels)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgewise.assets import bundled_asset


@dataclass(frozen=True, slots=True)
class LabelledFrames:
    images: np.ndarray  # float32 [M, 8, 8]
    labels: np.ndarray  # int64 [M]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_holdout(path: Path | None = None) -> LabelledFrames:
    with np.load(path or bundled_asset("digits_holdout.npz")) as data:
        images = np.ascontiguousarray(data["images"], dtype=np.float32)
        labels = np.asarray(data["labels"], dtype=np.int64)
    return LabelledFrames(images, labels)
