"""The exceptions of :mod:`edgewise.compress`. Every message names the file and says what to do;
onnx and onnxruntime exceptions are translated into these where they are called."""

from __future__ import annotations


class CompressError(Exception):
    """Base class: the operation did not happen and no output file was left behind."""


class SampleFileError(CompressError):
    """A calibration or labelled file is missing, too big, not an ``.npz`` of plain arrays, or
    its arrays do not fit the model (the message says what the model wants)."""


class QuantizeError(CompressError):
    """The model could not be quantized (not an ONNX model, nothing to quantize, the output
    would overwrite the input, onnxruntime's quantizer failed)."""


class CheckError(CompressError):
    """A model could not be measured (it does not load, or it and the reference disagree on
    the input they take or the classes they output)."""
