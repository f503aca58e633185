"""MQTT topic names: builders that refuse unsafe names, parsers, and validators.

Every name that becomes a topic level (device, sensor, node, model, hardware class) must be
a *level*: non-empty, no ``/``, ``+``, ``#``, NUL or other control characters, not starting
with ``$`` (reserved for broker topics), at most 128 UTF-8 bytes. Roots may span several
levels (``acme/sensors``) under the same rules. A name that breaks them raises
``ContractError("bad_topic")``; nothing is escaped or silently changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Final

from .errors import ContractError

MAX_LEVEL_BYTES: Final = 128
MAX_TOPIC_BYTES: Final = 65_535
SHARE_PREFIX: Final = "$share/"

_FORBIDDEN: Final = re.compile(r"[/+#\x00-\x1f\x7f-\x9f]")


def _bad(detail: str) -> ContractError:
    return ContractError("bad_topic", detail)


def _utf8_len(text: str, what: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise _bad(f"{what} {text[:64]!r} is not encodable as UTF-8") from None


def validate_level(level: str) -> str:
    """Return ``level`` if it is safe as one topic level, else raise ``bad_topic``."""
    if not isinstance(level, str) or not level:
        raise _bad(f"topic level must be a non-empty string, got {level!r}")
    found = _FORBIDDEN.search(level)
    if found:
        raise _bad(f"topic level {level[:64]!r} contains {found.group()!r}")
    if level.startswith("$"):
        raise _bad(f"topic level {level[:64]!r} starts with '$'")
    if _utf8_len(level, "topic level") > MAX_LEVEL_BYTES:
        raise _bad(f"topic level {level[:64]!r}... is longer than {MAX_LEVEL_BYTES} bytes")
    return level


def validate_topic(topic: str) -> str:
    """Return ``topic`` if we may publish to it: every level valid, <= 65535 UTF-8 bytes."""
    if not isinstance(topic, str):
        raise _bad(f"topic must be a string, got {type(topic).__name__}")
    _check_total(topic, "topic")
    for level in topic.split("/"):
        validate_level(level)
    return topic


def validate_filter(f: str) -> str:
    """Return ``f`` if it is a subscription filter we accept.

    Levels are valid levels or wildcards: ``+`` as a whole level, ``#`` only as the whole
    last level. ``$share/{group}/{filter}`` (a shared subscription) is allowed.
    """
    if not isinstance(f, str):
        raise _bad(f"filter must be a string, got {type(f).__name__}")
    _check_total(f, "filter")
    body = f
    if f.startswith(SHARE_PREFIX):
        group, sep, body = f[len(SHARE_PREFIX) :].partition("/")
        if not sep:
            raise _bad(f"shared subscription {f[:64]!r} needs $share/<group>/<filter>")
        validate_level(group)
    levels = body.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            if i != len(levels) - 1:
                raise _bad(f"filter {f[:64]!r}: '#' must be the last level")
        elif level != "+":
            validate_level(level)
    return f


def _check_total(topic: str, what: str) -> None:
    if not topic:
        raise _bad(f"{what} is empty")
    if _utf8_len(topic, what) > MAX_TOPIC_BYTES:
        raise _bad(f"{what} is longer than {MAX_TOPIC_BYTES} bytes")


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic tree (see DESIGN.md). Every root is configurable and may span levels."""

    sensors_root: str = "sensors"
    edge_root: str = "edge"
    cloud_root: str = "cloud"
    fleet_root: str = "fleet"
    models_root: str = "models"

    def __post_init__(self) -> None:
        for field in fields(self):
            root = getattr(self, field.name)
            try:
                validate_topic(root)
            except ContractError as exc:
                raise _bad(f"{field.name}: {exc.detail}") from None

    # sensors
    def sensor(self, device: str, sensor: str) -> str:
        """``{sensors_root}/{device}/{sensor}``: where a sensor publishes frames."""
        return f"{self.sensors_root}/{validate_level(device)}/{validate_level(sensor)}"

    def sensor_filter(self) -> str:
        """``{sensors_root}/+/+``: every sensor."""
        return f"{self.sensors_root}/+/+"

    def parse_sensor(self, topic: str) -> tuple[str, str]:
        """(device, sensor) of a sensor topic; ``bad_topic`` unless it is
        ``{sensors_root}/<device>/<sensor>`` with both valid levels."""
        prefix = self.sensors_root + "/"
        if not isinstance(topic, str) or not topic.startswith(prefix):
            raise _bad(f"{str(topic)[:128]!r} is not under {prefix!r}")
        parts = topic[len(prefix) :].split("/")
        if len(parts) != 2:
            raise _bad(f"{topic[:128]!r} is not {prefix}<device>/<sensor>")
        device, sensor = parts
        return validate_level(device), validate_level(sensor)

    # one node
    def results(self, node: str) -> str:
        return self._node(node, "results")

    def telemetry(self, node: str) -> str:
        return self._node(node, "telemetry")

    def status(self, node: str) -> str:
        return self._node(node, "status")

    def events(self, node: str) -> str:
        return self._node(node, "events")

    def deadletter(self, node: str) -> str:
        return self._node(node, "deadletter")

    def reply(self, node: str) -> str:
        return self._node(node, "reply")

    def cmd(self, node: str) -> str:
        return self._node(node, "cmd")

    def acks(self, node: str) -> str:
        """``{edge_root}/{node}/acks``: confirmations of the node's results messages
        (end-to-end mode, :mod:`schemas.acks`)."""
        return self._node(node, "acks")

    def _node(self, node: str, leaf: str) -> str:
        return f"{self.edge_root}/{validate_level(node)}/{leaf}"

    # cloud
    def escalations(self, model: str) -> str:
        """``{cloud_root}/escalations/{model}``: low-confidence cases for the cloud."""
        return f"{self.cloud_root}/escalations/{validate_level(model)}"

    def worker_status(self, worker: str) -> str:
        """``{cloud_root}/workers/{worker}/status``: a worker's retained presence."""
        return f"{self.cloud_root}/workers/{validate_level(worker)}/status"

    def worker_telemetry(self, worker: str) -> str:
        """``{cloud_root}/workers/{worker}/telemetry``: a worker's telemetry (not retained)."""
        return f"{self.cloud_root}/workers/{validate_level(worker)}/telemetry"

    def worker_status_filter(self) -> str:
        """Every worker's presence."""
        return f"{self.cloud_root}/workers/+/status"

    def parse_worker_status(self, topic: str) -> str | None:
        """The worker a presence topic names, or None if ``topic`` is not one."""
        prefix = f"{self.cloud_root}/workers/"
        if not (topic.startswith(prefix) and topic.endswith("/status")):
            return None
        worker = topic[len(prefix) : -len("/status")]
        return worker if worker and "/" not in worker else None

    def escalations_filter(self, group: str | None = "workers") -> str:
        """All escalations, as a shared subscription of ``group`` (``None``: unshared)."""
        plain = f"{self.cloud_root}/escalations/+"
        return plain if group is None else f"{SHARE_PREFIX}{validate_level(group)}/{plain}"

    # fleet
    def fleet_cmd(self, hw_class: str) -> str:
        """``{fleet_root}/{class}/cmd``: a signed command to a hardware class."""
        return f"{self.fleet_root}/{validate_level(hw_class)}/cmd"

    def fleet_model(self, hw_class: str, model: str) -> str:
        """``{fleet_root}/{class}/models/{model}``: the retained signed release manifest."""
        return f"{self.fleet_root}/{validate_level(hw_class)}/models/{validate_level(model)}"

    def fleet_keys(self) -> str:
        """``{fleet_root}/keys``: the retained signed trusted-key set."""
        return f"{self.fleet_root}/keys"

    def model_chunk(self, sha256: str, index: int) -> str:
        """``{models_root}/{sha256}/{index}``: one retained artifact chunk."""
        if type(index) is not int or index < 0:
            raise _bad(f"chunk index must be an int >= 0, got {index!r}")
        return f"{self.models_root}/{validate_level(sha256)}/{index}"
