"""The environment variables that carry a command's broker credentials: the ones the node's
``[mqtt]`` section reads (``EDGEWISE_MQTT__USERNAME``, ``EDGEWISE_MQTT__PASSWORD_FILE`` or
``EDGEWISE_MQTT__PASSWORD``, ``EDGEWISE_MQTT__TLS_CA_FILE``).

Every command that connects also takes ``--username``, ``--password-file`` and ``--tls-ca``
(a flag wins over its variable; :mod:`edgewise.cli.connect`), but never a password: a flag is
visible to every user of the machine (``ps``) and lands in shell histories and container specs
(docs/security.md).
"""

from __future__ import annotations

_ENV = {
    "username": "EDGEWISE_MQTT__USERNAME",
    "password": "EDGEWISE_MQTT__PASSWORD",
    "password_file": "EDGEWISE_MQTT__PASSWORD_FILE",
    "tls_ca_file": "EDGEWISE_MQTT__TLS_CA_FILE",
}
