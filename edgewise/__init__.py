"""edgewise: ML inference at the edge over MQTT.

The ``edgewise`` command lives in :mod:`edgewise.cli`.
"""

__version__ = "0.1.0"
