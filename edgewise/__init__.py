"""edgewise: ML inference at the edge over MQTT.

The ``edgewise`` command lives in :mod:`edgewise.cli.app`.
"""

__version__ = "0.1.0"
