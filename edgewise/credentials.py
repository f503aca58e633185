"""Broker credentials for the short-lived commands (``sensor simulate``, ``watch``, and the
operator's ``model``, ``keys``, ``cmd`` and ``fleet status``).

They come from the same environment variables the services read (``EDGEWISE_MQTT__USERNAME``,
``EDGEWISE_MQTT__PASSWORD_FILE`` or ``EDGEWISE_MQTT__PASSWORD``, ``EDGEWISE_MQTT__TLS_CA_FILE``),
never from a command-line flag: a flag is visible to every user of the machine (``ps``) and
lands in shell histories and container specs (docs/security.md).
"""

from __future__ import annotations

import os
from typing import Any

_ENV = {
    "username": "EDGEWISE_MQTT__USERNAME",
    "password": "EDGEWISE_MQTT__PASSWORD",
    "password_file": "EDGEWISE_MQTT__PASSWORD_FILE",
    "tls_ca_file": "EDGEWISE_MQTT__TLS_CA_FILE",
}


def mqtt_credentials_from_env() -> dict[str, Any]:
    """``MqttConfig`` keyword arguments for whichever of the variables are set (and not empty)."""
    return {key: os.environ[name] for key, name in _ENV.items() if os.environ.get(name)}
