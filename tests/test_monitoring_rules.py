"""What we ship for operators' monitoring: deploy/odmr-bridge.rules.yml (Prometheus alerting
rules) and deploy/grafana-dashboard.json, checked with the real promtool and against the
metric names the bridge really exports.

promtool comes from Debian's prometheus package, unpacked (not installed: that would start a
Prometheus server) by scripts/fetch-promtool into .cache/prometheus.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import REGISTRY, CollectorRegistry

from odmr_bridge import metrics
from odmr_bridge.spool import Spool
from tests.conftest import need
from tests.peers import ROOT

PROMTOOL = ROOT / ".cache" / "prometheus" / "root" / "usr" / "bin" / "promtool"
RULES = ROOT / "deploy" / "odmr-bridge.rules.yml"
RULE_TESTS = ROOT / "deploy" / "odmr-bridge.rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"

# Series Prometheus itself writes for every scrape target; the bridge cannot export them.
# OdmrBridgeDown uses `up`: with the bridge down, none of its own series can alert.
SCRAPE_SERIES = {"up"}

# PromQL words that look like identifiers but are not metric names (functions and
# aggregations are told apart by the "(" that follows them).
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
            "group_right", "offset", "bool", "atan2", "inf", "nan"}


def metric_names(promql: str) -> set[str]:
    """The metric names an expression selects: identifiers not followed by "(", once
    strings, label matchers {...}, ranges [...], grouping clauses by/on (...) and
    Grafana's $variables are blanked out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', " ", promql)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ",
                  text)
    text = re.sub(r"\$\w+", " ", text)
    # Grafana's label_values(metric, label): the second argument is a label.
    text = re.sub(r"\blabel_values\s*\(([^,()]*),\s*\w+\s*\)", r"(\1)", text)
    found = re.findall(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", text)
    return {name for name in found if name.lower() not in KEYWORDS}


def test_metric_names_are_read_out_of_promql() -> None:
    expr = ('sum by (domain) (rate(odmr_bridge_made_up_total{job=~"$job", x="a b"}'
            '[$__rate_interval])) * 3600 > 4.5 * 86400 and on (instance) up == bool 0')
    assert metric_names(expr) == {"odmr_bridge_made_up_total", "up"}
    assert metric_names("sum without (mechanism) (increase(x:y_total[5m])) > 20") == {
        "x:y_total"}
    assert metric_names('label_values(odmr_bridge_redis_up{job=~"$job"}, instance)') == {
        "odmr_bridge_redis_up"}
    assert metric_names("max(a) by (domain) offset 1h unless b") == {"a", "b"}


def rule_expressions() -> list[str]:
    """Each rule's expr, one line each (the file keeps them on one line so that this
    test reads them without a YAML parser; promtool's count checks none was missed)."""
    exprs = []
    for line in RULES.read_text().splitlines():
        match = re.match(r"\s*expr:\s*(.*)$", line)
        if match:
            expr = match.group(1).strip()
            assert expr and expr[0] not in "|>", f"expr on one line, please: {line!r}"
            exprs.append(expr)
    return exprs


def alert_blocks() -> dict[str, str]:
    """Alert name -> the text of its rule."""
    parts = re.split(r"^\s*- alert:\s*", RULES.read_text(), flags=re.MULTILINE)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


def dashboard_expressions() -> list[str]:
    """Every panel target's expr and every query variable's query."""
    dashboard = json.loads(DASHBOARD.read_text())
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found.append(query["query"] if isinstance(query, dict) else query)
    return found


@pytest.fixture
def promtool() -> Path:
    if not PROMTOOL.exists():
        need(str(PROMTOOL))  # scripts/fetch-promtool unpacks it
    return PROMTOOL


@pytest.fixture
def exported(redis_url: str, spool: Spool) -> Iterator[set[str]]:
    """The metric names the bridge exports, as a scrape of /metrics shows them: the
    counters odmr_bridge.metrics registers in prometheus_client's default registry
    (with the process and platform collectors), and the hold-queue collector that
    metrics.serve() adds, reading a real Redis index and spool."""
    client = redis.Redis.from_url(redis_url)
    hold_queue = CollectorRegistry()
    hold_queue.register(metrics.HoldQueueCollector(client, metrics.notices_in_spool(spool)))
    text = (generate_latest(REGISTRY) + generate_latest(hold_queue)).decode()
    client.close()
    samples = {(s.name, s.value) for family in text_string_to_metric_families(text)
               for s in family.samples}
    assert ("odmr_bridge_redis_up", 1) in samples, "the collector did not read Redis"
    # A labelled metric has no samples before its first event, but a TYPE line.
    declared = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.MULTILINE))
    yield {name for name, _ in samples} | declared


def test_the_rules_pass_promtool_check(promtool: Path) -> None:
    result = subprocess.run([str(promtool), "check", "rules", str(RULES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every rule was read by rule_expressions(): the same count promtool found.
    assert f"SUCCESS: {len(rule_expressions())} rules found" in result.stdout


def test_every_alert_fires_and_stays_quiet_in_promtools_unit_tests(promtool: Path) -> None:
    result = subprocess.run([str(promtool), "test", "rules", str(RULE_TESTS)],
                            capture_output=True, text=True, timeout=60, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    tests = RULE_TESTS.read_text()
    for alert in alert_blocks():
        tested = re.findall(rf"alertname: {alert}\n\s*exp_alerts:(.*)", tests)
        assert any(e.strip() == "[]" for e in tested), f"{alert}: no input leaves it quiet"
        assert any(e.strip() == "" for e in tested), f"{alert}: no input fires it"


def test_the_alerts_cover_what_operators_watch() -> None:
    alerts = alert_blocks()
    used = set().union(*(metric_names(e) for e in rule_expressions()))
    for metric in ("odmr_bridge_held_messages", "odmr_bridge_oldest_message_age_seconds",
                   "odmr_bridge_notices_waiting", "odmr_bridge_redis_up",
                   "odmr_bridge_auth_failures_total", "up"):
        assert metric in used, f"no alert on {metric}"
    for name, text in alerts.items():
        assert re.search(r"^\s*for: \d+[smhd]$", text, re.MULTILINE), f"{name}: no for:"
        assert re.search(r"^\s*severity: (warning|critical)$", text, re.MULTILINE), name
        assert re.search(r"^\s*summary: ", text, re.MULTILINE), f"{name}: no summary"
        assert re.search(r"^\s*description: ", text, re.MULTILINE), f"{name}: no description"


def test_the_rules_name_only_metrics_the_bridge_exports(exported: set[str]) -> None:
    used = set().union(*(metric_names(e) for e in rule_expressions()))
    assert used - exported - SCRAPE_SERIES == set()
    # Annotations name metrics too, for the operator to look up.
    mentioned = set(re.findall(r"\bodmr_bridge_\w+", RULES.read_text()))
    assert mentioned - exported == set()


def test_the_dashboard_queries_only_metrics_the_bridge_exports(exported: set[str]) -> None:
    exprs = dashboard_expressions()
    used = set().union(*(metric_names(e) for e in exprs))
    assert len(exprs) > 10 and "odmr_bridge_held_messages" in used
    assert used - exported == set()
    mentioned = set(re.findall(r"\bodmr_bridge_\w+", DASHBOARD.read_text()))
    assert mentioned - exported == set()


def test_the_dashboard_imports_with_a_prometheus_data_source_of_your_choice() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39
    [source] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert (source["name"], source["query"]) == ("DS_PROMETHEUS", "prometheus")
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert {p["datasource"]["uid"] for p in panels} == {"${DS_PROMETHEUS}"}
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
