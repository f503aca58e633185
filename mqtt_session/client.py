"""paho's client, minus per-message work this package never uses.

paho looks up per-topic callbacks (``message_callback_add``) for every PUBLISH it receives:
it decodes the topic, walks its topic matcher and takes two locks, before it calls
``on_message``. ``MqttSession`` registers no per-topic callbacks and drives the client from its
event loop's thread only, so that look-up found nothing and the locks guarded nothing: about 6 %
of an edge node's event loop in a flood of small frames (py-spy, docs/benchmarks.md).
:class:`DirectClient` calls ``on_message`` straight away instead.

This overrides a private method of paho 2.x (``Client._handle_on_message``, called by
``_handle_publish`` for QoS 0 and 1). ``tests/test_mqtt_session_client.py`` checks that paho
still has it and still calls it, so an upgrade that changes either fails there, not silently.
"""

from __future__ import annotations

import paho.mqtt.client as paho


class DirectClient(paho.Client):
    """A paho client whose received messages go to ``on_message`` only, without locks."""

    def message_callback_add(self, sub: str, callback: paho.CallbackOnMessage) -> None:
        raise NotImplementedError("DirectClient delivers every message to on_message")

    def _handle_on_message(self, message: paho.MQTTMessage) -> None:
        on_message = self.on_message
        if on_message is not None:
            # No exception handling here: the session's callback catches and counts its own.
            on_message(self, self._userdata, message)
