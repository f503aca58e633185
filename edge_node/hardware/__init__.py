"""Hardware classes: what a kind of device runs, and how the node uses its own.

* :mod:`.classes`  :class:`HardwareClass` and :func:`load_classes` (``hardware_classes.toml``)
* :mod:`.fit`      :class:`NodeHardware`: the class with the node's overrides; what fits it
* :mod:`.load`     :func:`load_model`: refuse what the class cannot run, load the rest with its
                   providers and threads

Errors are :mod:`edge_node.errors`' ``ConfigError`` (a bad file or class name, at start) and
``ModelRefused`` (a model the class cannot run). See ``docs/hardware-classes.md``.
"""

from edge_node.hardware.classes import HardwareClass, load_classes, shipped_classes_file
from edge_node.hardware.fit import NodeHardware, Refusal, RuntimeSettings, resolve
from edge_node.hardware.load import load_model

__all__ = [
    "HardwareClass",
    "NodeHardware",
    "Refusal",
    "RuntimeSettings",
    "load_classes",
    "load_model",
    "resolve",
    "shipped_classes_file",
]
