"""Load a model the way the node's hardware class says, or refuse it with the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from edge_node.errors import ModelLoadError, ModelRefused
from edge_node.hardware.fit import NodeHardware
from edgewise.releases.formats import format_of
from edgewise.serving.errors import ModelLoadError as ServingLoadError
from edgewise.serving.model import ServedModel


def load_model(
    hardware: NodeHardware,
    path: str | Path,
    *,
    name: str,
    release: int,
    output: Literal["probabilities", "logits"],
) -> ServedModel:
    """Check ``path`` against the class (format by suffix, size), load it with the class's
    providers and threads for that format, then check its input size.

    Raises :class:`ModelRefused` if the class cannot run it, :class:`ModelLoadError` if the
    runtime cannot load it.
    """
    file = Path(path)
    refusal = hardware.refuse_file(file)
    if refusal is not None:
        raise ModelRefused(refusal.reason, refusal.detail)
    fmt = format_of(file)
    assert fmt is not None, "refuse_file refuses any other suffix"
    settings = hardware.settings_for(fmt)
    try:
        served = ServedModel.load(
            str(file),
            name=name,
            release=release,
            output=output,
            providers=settings.providers,
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
        )
    except ServingLoadError as exc:  # the serving layer's error, as the node's (one boundary)
        raise ModelLoadError(str(exc)) from exc.__cause__
    refusal = hardware.refuse_input(served.runtime.input_spec.sample_shape, f"model {file}")
    if refusal is not None:
        served.close()
        raise ModelRefused(refusal.reason, refusal.detail)
    return served
