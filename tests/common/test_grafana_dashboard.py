"""deploy/grafana/: every dashboard query is PromQL that Prometheus parses
(``promtool check rules`` on the queries as recording rules) and names only metrics
the services really export, checked against live scrapes of a scheduler, a
predictor and a worker (the stack of test_service_metrics). The provisioning points
Grafana at that dashboard folder and at a Prometheus data source whose uid the
panels use."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_service_metrics import Live, live, scrape  # noqa: F401  (live: the stack fixture)
from tools import promtool

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "shortline.json"

# Grafana's own variables, replaced by what they stand for before Prometheus parses.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


def expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every target's PromQL, panels inside rows included, Grafana variables expanded."""
    found = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for var, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(var, value)
                found.append(expr)
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not
    functions or aggregations (followed by a parenthesis, or by ``by``/``without``),
    keywords, label names (inside braces or a grouping list), durations, numbers or
    strings."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1 ", text
    )  # grouping labels
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)\b(?!\s*\(|\s+(?:by|without)\b)", text):
        if m.group(1).lower() not in KEYWORDS:
            names.add(m.group(1))
    return names


def exported_names(text: str) -> set[str]:
    """Series names a scrape can hold: each sample's, and each family's (a histogram
    as its _bucket, _sum and _count), so a labelled family not yet observed counts."""
    names = set(re.findall(r"^([a-zA-Z_:][\w:]*)[{ ]", text, re.M))
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)", text, re.M):
        suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}
        names.update(name + s for s in suffixes.get(kind, ("",)))
    return names


def unknown_metrics(dashboard: dict[str, Any], exported: set[str]) -> set[str]:
    return {n for e in expressions(dashboard) for n in metric_names(e)} - exported


def promtool_parses(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    return subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, model) (rate(shortline_queue_wait_seconds_bucket"
        '{model=~"a|b", policy="ssjf"}[5m]))) > 10 and on (model) up offset 5m'
        " / sum without (worker) (shortline_worker_slots) unless shortline_x:rate5m"
    )
    assert metric_names(expr) == {
        "shortline_queue_wait_seconds_bucket",
        "up",
        "shortline_worker_slots",
        "shortline_x:rate5m",
    }


def test_every_query_parses_and_a_broken_one_does_not(tmp_path: Path) -> None:
    exprs = expressions(load())
    assert len(exprs) >= 20
    done = promtool_parses(exprs, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = promtool_parses(
        [*exprs, "sum by (model) (rate(shortline_requests_total[5m])"], tmp_path
    )
    assert broken.returncode != 0


@pytest.mark.slow  # the stack: about 35 s with Triton's start
def test_every_query_names_a_metric_the_services_export(live: Live) -> None:  # noqa: F811
    exported: set[str] = set()
    for port in live.ports.values():
        exported |= exported_names(scrape(port))
    dashboard = load()
    assert unknown_metrics(dashboard, exported) == set()
    # The check is not vacuous: each service's metrics are on the dashboard...
    used = {n for e in expressions(dashboard) for n in metric_names(e)}
    for family in ("shortline_prediction_kendall_tau", "shortline_worker_tokens_total"):
        assert family in used
    assert "shortline_predict_seconds_bucket" in used
    # ...and a query naming a metric nobody exports is caught.
    invented = json.loads(json.dumps(dashboard))
    invented["panels"][-1]["targets"].append(
        {"refId": "Z", "expr": "sum(rate(shortline_predictor_drift_total[$__rate_interval]))"}
    )
    assert unknown_metrics(invented, exported) == {"shortline_predictor_drift_total"}


def test_provisioning_loads_the_dashboard_from_prometheus() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    uids: set[str] = set()

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            uids.update(t["datasource"]["uid"] for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(load()["panels"])
    assert uids == {source["uid"]}
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/shortline.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].rstrip("/").endswith("dashboards")


@pytest.mark.parametrize("name", ["shortline_prediction_kendall_tau", "up"])
def test_grafana_variables_are_expanded_before_parsing(name: str) -> None:
    dashboard = {"panels": [{"targets": [{"expr": f"rate({name}[$__rate_interval])"}]}]}
    assert expressions(dashboard) == [f"rate({name}[5m])"]
