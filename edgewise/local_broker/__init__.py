"""Local MQTT brokers for tests and ``edgewise demo``.

* :class:`MosquittoProcess` runs a real mosquitto on a free loopback port with a generated
  config that includes the shared tuning (``tuning.conf``, from ``compose/mosquitto/conf.d``).
* :class:`EmbeddedBroker` runs amqtt in-process (MQTT 3.1.1 only) where mosquitto is missing.
* :func:`parse_broker_url` / :class:`BrokerInfo` describe any broker, including external ones;
  :func:`parse_broker` / :class:`BrokerUrl` also take ``mqtts://`` (TLS).
* :class:`MqttProbe` is a blocking paho client for tests and smoke checks;
  :class:`ResultSink` one that counts results and confirms them (end-to-end mode).
* :class:`TcpProxy` sits between a client and a broker and cuts, stalls or flaps the link.
"""

from edgewise.local_broker.embedded import (
    MQTT5_CONNACK_RETURN_CODE,
    EmbeddedBroker,
    EmbeddedBrokerThread,
    quiet_amqtt_logging,
)
from edgewise.local_broker.info import (
    DEFAULT_MQTT_PORT,
    DEFAULT_MQTTS_PORT,
    LOOPBACK,
    BrokerInfo,
    BrokerKind,
    BrokerUrl,
    free_port,
    parse_broker,
    parse_broker_url,
)
from edgewise.local_broker.mosquitto import (
    TUNING_CONF,
    BrokerStartError,
    MosquittoProcess,
    live_processes,
    mosquitto_path,
    read_tuning,
    tuning_conf_path,
    write_mosquitto_config,
)
from edgewise.local_broker.ping import accepts_mqtt, mqtt_ping
from edgewise.local_broker.probe import (
    DisconnectEvent,
    Message,
    MqttProbe,
    ProbeError,
    unique_client_id,
)
from edgewise.local_broker.sink import ResultSink, acks_topic_of
from edgewise.local_broker.tcpproxy import TcpProxy

__all__ = [
    "DEFAULT_MQTTS_PORT",
    "DEFAULT_MQTT_PORT",
    "LOOPBACK",
    "MQTT5_CONNACK_RETURN_CODE",
    "TUNING_CONF",
    "BrokerInfo",
    "BrokerKind",
    "BrokerStartError",
    "BrokerUrl",
    "DisconnectEvent",
    "EmbeddedBroker",
    "EmbeddedBrokerThread",
    "Message",
    "MosquittoProcess",
    "MqttProbe",
    "ProbeError",
    "ResultSink",
    "TcpProxy",
    "accepts_mqtt",
    "acks_topic_of",
    "free_port",
    "live_processes",
    "mosquitto_path",
    "mqtt_ping",
    "parse_broker",
    "parse_broker_url",
    "quiet_amqtt_logging",
    "read_tuning",
    "tuning_conf_path",
    "unique_client_id",
    "write_mosquitto_config",
]
