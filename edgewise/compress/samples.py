"""Sample files for calibration and checking: one ``.npz`` archive of plain arrays.

=====  =========================================  ============================================
array  shape and dtype                            meaning
=====  =========================================  ============================================
``x``  ``[N, *sample]``, the model's input dtype  the inputs, exactly as the model takes them
``y``  ``[N]``, any integer dtype, in ``[0, C)``  the label of each input (``check`` needs it)
=====  =========================================  ============================================

``images`` or ``inputs`` may stand for ``x`` and ``labels`` for ``y``, so the bundled held-out
digits (``edgewise/assets/digits_holdout.npz``: ``images`` float32 [540, 8, 8], ``labels``
int64) and ``model publish --golden`` files work as they are. Write one with
``np.savez_compressed("data.npz", x=x, y=y)``.

Loading is defensive: ``allow_pickle=False``; each array's size is read from its ``.npy``
header before it is decompressed and capped at :data:`MAX_SAMPLE_BYTES`; object arrays,
non-finite floats, a dtype that is not the model's (no silent casts) or a sample shape that does
not fit are refused with a :class:`SampleFileError` that says what the model wants.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from edgewise.compress.errors import SampleFileError
from edgewise.serving.runtime import TensorSpec, format_shape

X_KEYS: tuple[str, ...] = ("x", "images", "inputs")
Y_KEYS: tuple[str, ...] = ("y", "labels")
MAX_SAMPLE_BYTES = 512 * 1024 * 1024
"""The largest array (uncompressed) and the largest file read."""


@dataclass(frozen=True, slots=True)
class Samples:
    """The arrays of one sample file, checked against one model input."""

    path: Path
    x: npt.NDArray[Any]
    y: npt.NDArray[np.int64] | None

    def __len__(self) -> int:
        return int(self.x.shape[0])


def read_samples(
    path: Path,
    spec: TensorSpec,
    *,
    role: str,
    classes: int | None = None,
    need_labels: bool = False,
    max_bytes: int = MAX_SAMPLE_BYTES,
) -> Samples:
    """Read and check ``path`` for a model whose input is ``spec`` and that scores ``classes``.

    ``role`` names the file in messages (e.g. ``--calibration``). Raises
    :class:`SampleFileError` for anything that does not fit.
    """
    where = f"{role} {path}"
    if not path.is_file():
        raise SampleFileError(f"{where}: no such file")
    size = path.stat().st_size
    if size > max_bytes:
        raise SampleFileError(f"{where}: {size:,} bytes, more than the {max_bytes:,} allowed")
    headers = _headers(path, where)
    x_key = _pick(headers, X_KEYS)
    if x_key is None:
        raise SampleFileError(
            f"{where}: no array {' / '.join(X_KEYS)} (it has: {', '.join(headers) or 'none'}); "
            f"{_wants(spec)}"
        )
    y_key = _pick(headers, Y_KEYS)
    for key in (x_key, y_key):
        if key is not None:
            _check_header(where, key, *headers[key], max_bytes)
    try:
        with np.load(path, allow_pickle=False) as data:
            x = np.asarray(data[x_key])
            y = None if y_key is None else np.asarray(data[y_key])
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise SampleFileError(f"{where}: cannot read the archive: {exc}") from exc
    _check_x(where, x_key, x, spec)
    if y is None:
        if need_labels:
            raise SampleFileError(
                f"{where}: no labels; add y (or labels), int [{len(x)}], one class per sample"
            )
        return Samples(path, np.ascontiguousarray(x), None)
    return Samples(path, np.ascontiguousarray(x), _check_y(where, y_key or "y", y, len(x), classes))


def _wants(spec: TensorSpec) -> str:
    sample = ", ".join("?" if d is None else str(d) for d in spec.sample_shape)
    return (
        f"the model's input {spec.name!r} wants x as {spec.dtype} [N{', ' if sample else ''}"
        f"{sample}]"
    )


def _pick(headers: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in headers), None)


def _headers(path: Path, where: str) -> dict[str, tuple[tuple[int, ...], np.dtype[Any]]]:
    """Shape and dtype of each array, from the ``.npy`` headers (nothing decompressed beyond)."""
    if not zipfile.is_zipfile(path):
        raise SampleFileError(
            f"{where}: not an .npz archive; write one with np.savez_compressed(FILE, x=..., y=...)"
        )
    found: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if not name.endswith(".npy"):
                    continue
                with archive.open(name) as member:
                    found[name[: -len(".npy")]] = _header(member)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise SampleFileError(f"{where}: cannot read the archive: {exc}") from exc
    return found


def _header(member: IO[bytes]) -> tuple[tuple[int, ...], np.dtype[Any]]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return tuple(int(d) for d in shape), np.dtype(dtype)


def _check_header(
    where: str, key: str, shape: tuple[int, ...], dtype: np.dtype[Any], max_bytes: int
) -> None:
    if dtype.hasobject:
        raise SampleFileError(f"{where}: {key} holds Python objects; only numeric arrays are read")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise SampleFileError(
            f"{where}: {key} is {nbytes:,} bytes uncompressed, more than the {max_bytes:,} "
            "allowed; use fewer samples"
        )


def _check_x(where: str, key: str, x: npt.NDArray[Any], spec: TensorSpec) -> None:
    got = f"{key} is {x.dtype} {format_shape(x.shape)}"
    if x.ndim == 0 or x.shape[0] == 0:
        raise SampleFileError(f"{where}: no samples ({got}); {_wants(spec)}")
    if spec.accepts(x[0]) is not None:
        raise SampleFileError(f"{where}: {got}, which does not fit: {_wants(spec)}")
    if x.dtype.kind in "fc" and not bool(np.isfinite(x).all()):
        raise SampleFileError(f"{where}: {key} has NaN or infinite values")


def _check_y(
    where: str, key: str, y: npt.NDArray[Any], n: int, classes: int | None
) -> npt.NDArray[np.int64]:
    if y.dtype.kind not in "iu" or y.shape != (n,):
        raise SampleFileError(
            f"{where}: {key} is {y.dtype} {format_shape(y.shape)}; want integer class labels "
            f"[{n}], one per sample"
        )
    labels = y.astype(np.int64)
    if n and (int(labels.min()) < 0 or (classes is not None and int(labels.max()) >= classes)):
        top = "" if classes is None else f" (the model scores {classes} classes)"
        raise SampleFileError(
            f"{where}: {key} has labels outside [0, {classes if classes else 'C'}){top}"
        )
    return labels
