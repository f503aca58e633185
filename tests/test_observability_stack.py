"""The compose stack's profile observability checked against the code (Docker does not run
here): the exporter, Prometheus and Grafana services, Prometheus' scrape target, Grafana's data
source, and every query of the shipped dashboard against the exporter's metric catalogue. The
queries are also run by a real Prometheus in tests/test_exporter_prometheus.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from edgewise.cli.exporter import METRICS

REPO = Path(__file__).resolve().parents[1]
OBS = REPO / "compose" / "observability"
DASHBOARD = OBS / "grafana" / "dashboards" / "edgewise-fleet.json"
EXPOSED = {name for m in METRICS for name in m.exposed}
METRIC = re.compile(r"\bedgewise_[a-z0-9_]+\b")


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def panels() -> list[dict[str, Any]]:
    out = []
    for p in dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return [p for p in out if p.get("type") != "row"]


def expressions() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template variables."""
    exprs = [t["expr"] for p in panels() for t in p["targets"]]
    for var in dashboard()["templating"]["list"]:
        exprs.append(var["definition"])
    return exprs


def runnable(expr: str) -> str:
    """A dashboard expression as Prometheus can run it: Grafana's variables filled in, and
    Grafana's ``label_values(SELECTOR, LABEL)`` as the selector it queries."""
    expr = re.sub(r"^label_values\((.*), *[a-z_]+\)$", r"\1", expr)
    return expr.replace("$__rate_interval", "1m").replace("$node", ".*")


def test_every_dashboard_query_names_only_exported_metrics() -> None:
    exprs = expressions()
    assert len(exprs) >= 20
    named = set()
    for expr in exprs:
        names = set(METRIC.findall(expr))
        assert names, f"no edgewise metric in {expr!r}"
        assert names <= EXPOSED, f"{expr!r} names {names - EXPOSED}, not exported"
        named |= names
    # The four rows of docs/observability.md are there: fleet, node, rollout, bridges.
    rows = [p["title"] for p in dashboard()["panels"] if p.get("type") == "row"]
    assert rows == ["Fleet overview", "Node $node", "Model rollout", "Bridges"]
    assert {"edgewise_fleet_latency_seconds", "edgewise_node_update_state"} <= named
    assert any(n.startswith("edgewise_bridge_") for n in named)


def test_every_panel_uses_a_provisioned_data_source() -> None:
    provisioned = yaml.safe_load(
        (OBS / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uids = {d["uid"] for d in provisioned["datasources"]}
    used = [p["datasource"]["uid"] for p in panels()]
    used += [t["datasource"]["uid"] for p in panels() for t in p["targets"]]
    used += [v["datasource"]["uid"] for v in dashboard()["templating"]["list"]]
    assert used and set(used) <= uids, set(used) - uids
    urls = {d["url"] for d in provisioned["datasources"]}
    assert urls == {"http://prometheus:9090"}
    provider = yaml.safe_load(
        (OBS / "grafana" / "provisioning" / "dashboards" / "edgewise.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_panel_ids_are_unique_and_the_grid_has_no_overlap() -> None:
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dashboard()["panels"]:
        g = p["gridPos"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        assert g["x"] + g["w"] <= 24
        cells |= mine


def test_the_observability_profile_wires_exporter_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((REPO / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("exporter", "prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"], name
    cmd = services["exporter"]["command"]
    assert cmd[:3] == ["edgewise", "fleet", "exporter"]
    port = cmd[cmd.index("--listen") + 1].rsplit(":", 1)[1]
    scrape = yaml.safe_load((OBS / "prometheus.yml").read_text())
    targets = [
        t for job in scrape["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    ]
    assert targets == [f"exporter:{port}"]
    grafana_mounts = {v.split(":")[0]: v.split(":")[1] for v in services["grafana"]["volumes"]}
    assert grafana_mounts["./observability/grafana/dashboards"] == "/var/lib/grafana/dashboards"
    assert services["exporter"]["environment"]["EDGEWISE_MQTT__USERNAME"] == "monitor"


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Prometheus, which ./dev.sh test installs"
    out = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(OBS / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
