"""Model compression for operators: int8 quantization with ONNX Runtime's tools
(:mod:`edgewise.compress.quantize`) and the size / accuracy / agreement / latency check that shows
what it cost (:mod:`edgewise.compress.check`), on sample files described in
:mod:`edgewise.compress.samples`. Guide: docs/compression.md; design: ADR 0060.

The CLI is ``edgewise model quantize`` and ``edgewise model check`` (edgewise/cli/quantize_cmd.py).
``quantize`` needs the ``onnx`` package (``pip install 'edgewise[quantize]'``); ``check`` needs
only the node's runtimes.
"""

from __future__ import annotations

from edgewise.compress.errors import CheckError, CompressError, QuantizeError, SampleFileError

__all__ = ["CheckError", "CompressError", "QuantizeError", "SampleFileError"]
