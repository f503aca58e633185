"""``edgewise fleet exporter``: the fleet's status, telemetry and update events as Prometheus
metrics (docs/observability.md).

* :mod:`.catalogue`: every metric it serves (name, type, labels, help), the one list the
  collector, the dashboards' test and the docs use;
* :mod:`.fleet`: what is known about every node, worker and bridge, built from untrusted
  messages (pure: topic and bytes in);
* :mod:`.collector`: that state as Prometheus metric families, at scrape time;
* :mod:`.service`: the MQTT session and the HTTP endpoint.
"""

from edgewise.cli.exporter.catalogue import METRICS, Metric
from edgewise.cli.exporter.fleet import FleetMetrics

__all__ = ["METRICS", "FleetMetrics", "Metric"]
