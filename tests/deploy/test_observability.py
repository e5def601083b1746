"""deploy/observability and deploy/compose, checked with real tools: promtool (rules, their
unit tests, configs), the compose-spec schema (check-jsonschema) and docker-compose, and every
PromQL metric name against what the service's metrics module really exposes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "deploy" / "observability"
COMPOSE_DIR = ROOT / "deploy" / "compose"
DASHBOARD = OBSERVABILITY / "grafana" / "dashboards" / "bento-canary.json"

# The service's metric families (service/metrics.py) and their exposition suffixes.
COUNTERS = {"canary_requests", "canary_overload_rejections", "canary_cache_events", "canary_predictions"} | {
    f"canary_shadow_{name}"
    for name in ("requests_compared", "rows_compared", "rows_agreed", "confidence_candidate", "confidence_stable",
                 "latency_candidate_seconds", "latency_stable_seconds", "unmatched")
}  # fmt: skip
HISTOGRAMS = {
    "canary_request_duration_seconds",
    "canary_batch_rows",
    "canary_batch_requests",
    "canary_inference_duration_seconds",
    "canary_prediction_confidence",
}
GAUGES = {"canary_queue_rows", "canary_model_info", "canary_input_drift_psi", "canary_input_drift_rows"}
SERVICE_SERIES = (
    {f"{name}_total" for name in COUNTERS}
    | {f"{name}_{suffix}" for name in HISTOGRAMS for suffix in ("bucket", "sum", "count")}
    | GAUGES
)
NOT_FROM_THE_SERVICE = {"canary_router_weight", "up"}  # the router's gauge; Prometheus' own
KNOWN_SERIES = SERVICE_SERIES | NOT_FROM_THE_SERVICE

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
             "bool", "offset", "inf", "nan"}  # fmt: skip


def promtool() -> str:
    return require_tool("promtool", installs="prometheus, which ships promtool")


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects (label values, ranges, functions removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\b\d+(ms|[smhdwy])\b", " ", text)  # durations (offset 1h)
    text = re.sub(r"\b\d+(\.\d+)?(e[+-]?\d+)?\b", " ", text)  # numbers
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        following = text[match.end() :].lstrip()
        if match.group() not in _KEYWORDS and not following.startswith("("):
            names.add(match.group())
    return names


def test_metric_name_extraction_sees_through_promql():
    expr = ('histogram_quantile(0.95, sum by (slot, le) (rate(canary_request_duration_seconds_bucket'
            '{model=~"$model",status=~"5..|up"}[5m]))) / ignoring (class) group_left () '
            'sum without (x) (slot:canary_requests:rate5m offset 1h) > bool 1e3 or up')  # fmt: skip
    assert metric_names(expr) == {"canary_request_duration_seconds_bucket", "slot:canary_requests:rate5m", "up"}


# -- Prometheus: rules and config --------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((OBSERVABILITY / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_pass_promtool_check():
    run = subprocess.run(
        [promtool(), "check", "rules", str(OBSERVABILITY / "alerts.yml")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_alerts_fire_on_bad_candidates_and_stay_quiet_on_twins():
    """promtool's unit tests (alerts.test.yml): failing, slow, differently-answering and down
    slots raise the right alert with the slot named; healthy twins and an idle slot do not."""
    run = subprocess.run(
        [promtool(), "test", "rules", "alerts.test.yml"], cwd=OBSERVABILITY, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_alert_rules_cover_slo_burn_divergence_cache_and_down_slots():
    alerts = {rule["alert"]: rule for rule in alert_rules() if "alert" in rule}
    assert {
        "BentoErrorBudgetFastBurn", "BentoErrorBudgetSlowBurn", "BentoLatencyBudgetFastBurn",
        "BentoLatencyBudgetSlowBurn", "CanaryErrorRatioAboveOtherSlot", "CanaryLatencyAboveOtherSlot",
        "CanaryPredictionMixDiverges", "CanaryConfidenceShift", "BentoCacheErrors", "BentoSlotDown",
    } <= set(alerts)  # fmt: skip
    assert "up{" in alerts["BentoSlotDown"]["expr"] and "== 0" in alerts["BentoSlotDown"]["expr"]
    for rule in alerts.values():
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alert_rules_use_only_real_metrics_and_defined_recordings():
    rules = alert_rules()
    recorded = {rule["record"] for rule in rules if "record" in rule}
    for rule in rules:
        names = metric_names(rule["expr"])
        unknown = {name for name in names if name not in KNOWN_SERIES and name not in recorded}
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: unknown series {sorted(unknown)}"


@pytest.mark.parametrize("targets", ["local", "compose"])
def test_prometheus_config_passes_promtool_for_the_local_and_compose_stacks(tmp_path, targets):
    """Laid out as each stack mounts it: the config, alerts.yml beside it, targets/ below."""
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(OBSERVABILITY / name, tmp_path / name)
    source = OBSERVABILITY / "targets" if targets == "local" else COMPOSE_DIR / "prometheus-targets"
    shutil.copytree(source, tmp_path / "targets")
    run = subprocess.run(
        [promtool(), "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    groups = [group for path in (tmp_path / "targets").glob("*.yml") for group in yaml.safe_load(path.read_text())]
    slots = {group["labels"].get("slot") for group in groups if group["labels"]["component"] == "slot"}
    assert slots == {"blue", "green"}
    assert [group["labels"]["component"] for group in groups].count("router") == 1


# -- Grafana -----------------------------------------------------------------------------


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every query, the template variable's included."""
    board = json.loads(DASHBOARD.read_text())
    queries = [(panel["title"], target["expr"]) for panel in board["panels"] for target in panel.get("targets", ())]
    for variable in board["templating"]["list"]:
        inner = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["query"]["query"])
        assert inner, variable
        queries.append((f"${variable['name']}", inner.group(1)))
    return queries


def as_promql(expr: str) -> str:
    """Grafana's variables replaced by what Grafana sends Prometheus."""
    return expr.replace("$__rate_interval", "1m").replace("$model", ".+")


def test_dashboard_queries_use_only_metrics_that_exist():
    for title, expr in dashboard_queries():
        unknown = metric_names(expr) - KNOWN_SERIES
        assert not unknown, f"panel {title!r} queries unknown series {sorted(unknown)}"


def test_dashboard_queries_are_valid_promql(tmp_path):
    rules = [{"record": f"dashboard:query_{index}:check", "expr": as_promql(expr)}
             for index, (_, expr) in enumerate(dashboard_queries())]  # fmt: skip
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_dashboard_shows_every_view_per_slot_and_version():
    board = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries()
    used = set().union(*(metric_names(expr) for _, expr in queries))
    assert {
        "canary_requests_total", "canary_request_duration_seconds_bucket", "canary_batch_rows_sum",
        "canary_queue_rows", "canary_cache_events_total", "canary_predictions_total",
        "canary_prediction_confidence_sum", "canary_router_weight",
    } <= used  # fmt: skip
    by_title: dict[str, str] = {}
    for title, expr in queries:
        by_title[title] = f"{by_title.get(title, '')} {expr}"

    assert "by (slot, version)" in by_title["Requests per second by slot and version"]
    assert "histogram_quantile(0.95" in by_title["p95 latency by slot and version"]
    assert 'status=~"5..' in by_title["Error ratio by slot and version"]
    assert 'kind="hit"' in by_title["Cache hit ratio"]
    assert "by (version, class)" in by_title["Predicted-class mix by version"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    assert all(panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24 for panel in board["panels"])


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    provisioning = OBSERVABILITY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    board = json.loads(DASHBOARD.read_text())
    uids = {panel["datasource"]["uid"] for panel in board["panels"] if "datasource" in panel}
    assert uids == {source["uid"]} and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "bento-canary.yaml").read_text())["providers"]
    grafana = compose()["services"]["grafana"]
    assert f"../observability/grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]


# -- the metric names against the real service -------------------------------------------

_EXPOSE = textwrap.dedent(
    """
    import prometheus_client
    from service.core.model import ModelCard
    from service.core.shadow_compare import ShadowTally
    from service.metrics import ServiceMetrics

    card = ModelCard("digits", "3", "ab" * 32, (), (), "logits", "logits", lineage={"architecture": "cnn"})
    metrics = ServiceMetrics(card, "blue")
    metrics.request("rest", "200", 0.01)
    metrics.batch(4, 2, 0.002)
    metrics.queue_depth(3)
    metrics.rejected()
    metrics.cache_event("hit", 1)
    metrics.predictions([1, 7], [0.9, 0.6])
    metrics.input_drift(0.02, 500)
    metrics.shadow_compared([ShadowTally("2", 1, 1, 1, 0.9, 0.8, 0.004, 0.003)])
    metrics.shadow_unmatched(1)
    for family in prometheus_client.REGISTRY.collect():
        for sample in family.samples:
            print(sample.name)
    """
)


def test_every_queried_service_metric_is_exposed_by_service_metrics():
    """The service's own metrics module, every observer method called once, exposes every
    series the dashboard and alerts query (a fresh process: its default registry is clean)."""
    run = subprocess.run([sys.executable, "-c", _EXPOSE], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    exposed = {name for name in run.stdout.split() if name.startswith("canary_")}
    assert exposed >= SERVICE_SERIES
    queried = set().union(*(metric_names(expr) for _, expr in dashboard_queries()))
    queried |= set().union(*(metric_names(rule["expr"]) for rule in alert_rules()))
    queried = {name for name in queried if ":" not in name}
    assert queried - NOT_FROM_THE_SERVICE <= exposed


@pytest.mark.slow
def test_queried_metrics_appear_on_a_served_bento(serving):
    """After one answered request a real `bentoml serve` shows every queried service series,
    except those that need more: the overload counter (a refused request), input drift (200
    logged rows) and the shadow diff (a shadow copy)."""
    from prometheus_client.parser import text_string_to_metric_families

    httpx.post(f"{serving.url}/classify", json={"pixels": [[0.0] * 64]}, timeout=30).raise_for_status()
    text = httpx.get(f"{serving.url}/metrics", timeout=10).text
    served = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    queried = set().union(*(metric_names(expr) for _, expr in dashboard_queries()))
    queried |= set().union(*(metric_names(rule["expr"]) for rule in alert_rules()))
    missing = {name for name in queried if ":" not in name} - NOT_FROM_THE_SERVICE - served
    later = {"canary_overload_rejections_total", "canary_input_drift_psi", "canary_input_drift_rows"}
    assert {name for name in missing if not name.startswith("canary_shadow_")} <= later, sorted(missing)


# -- compose -----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())


def test_compose_file_matches_the_compose_spec_schema():
    run = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(COMPOSE_DIR / "compose.yaml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


def test_compose_services_have_healthchecks_slot_settings_and_existing_mounts():
    services = compose()["services"]
    assert set(services) == {"redis", "blue", "green", "nginx", "prometheus", "grafana"}
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] in {"CMD", "CMD-SHELL"}, name
    for slot in ("blue", "green"):
        service = services[slot]
        assert service["image"].startswith(f"${{CANARY_IMAGE_REPOSITORY:-digits-service}}:${{{slot.upper()}_TAG:?")
        assert service["environment"] == {
            "CANARY_SERVICE_SLOT": slot,
            "CANARY_SERVICE_GRPC_HOST": "0.0.0.0",
            "CANARY_SERVICE_GRPC_PORT": "50051",
            "CANARY_SERVICE_REST_HOST": "0.0.0.0",
            "CANARY_SERVICE_REST_PORT": "8000",
            "CANARY_SERVICE_CACHE_URL": "redis://redis:6379/0",
            "CANARY_SERVICE_CACHE_PASSWORD": "${CANARY_REDIS_PASSWORD:?set CANARY_REDIS_PASSWORD (canary --target compose does)}",
            "CANARY_SERVICE_CACHE_HMAC_KEY": "${CANARY_CACHE_HMAC_KEY:?set CANARY_CACHE_HMAC_KEY (canary --target compose does)}",
            "BENTOML_HOME": "/var/lib/bentoml",
        }
        assert "/v2/health/ready" in " ".join(service["healthcheck"]["test"])
        assert service["read_only"] is True and service["user"] == "1034:1034"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    generated = "${CANARY_RENDERED_DIR:-./rendered}:"  # written by `canary --target compose up`
    for name, service in services.items():
        for volume in service.get("volumes", ()):
            source = volume.split(":")[0]
            if volume.startswith(generated):
                continue
            assert (COMPOSE_DIR / source).exists(), f"{name} mounts missing {source}"
    assert "rendered/" in (COMPOSE_DIR / ".gitignore").read_text().split()
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in services["prometheus"]["volumes"]}
    assert mounts == {
        "/etc/prometheus/prometheus.yml": "../observability/prometheus.yml",
        "/etc/prometheus/alerts.yml": "../observability/alerts.yml",
        "/etc/prometheus/targets": "./prometheus-targets",
    }
    assert any(volume.startswith("../../nginx:") for volume in services["nginx"]["volumes"])


def test_compose_scrape_targets_are_the_compose_services():
    services = compose()["services"]
    for group in yaml.safe_load((COMPOSE_DIR / "prometheus-targets" / "compose.yml").read_text()):
        for target in group["targets"]:
            host, port = target.split(":")
            assert host in services
            published = [mapping.rsplit(":", 1)[-1] for mapping in services[host].get("ports", ())]
            assert port in services[host].get("expose", []) + published, target


def test_docker_compose_resolves_the_file_and_demands_the_slot_tags():
    docker_compose = require_tool("docker-compose", installs="docker-compose")
    command = [docker_compose, "-p", "bento-canary", "-f", str(COMPOSE_DIR / "compose.yaml"), "config"]
    env = {key: value for key, value in os.environ.items() if not key.endswith("_TAG")}
    secrets = {"CANARY_REDIS_PASSWORD": "redis-pass-0123456789", "CANARY_CACHE_HMAC_KEY": "hmac-key-0123456789",
               "CANARY_GRAFANA_PASSWORD": "grafana-pass-0123456789"}  # fmt: skip
    env = {key: value for key, value in env.items() if key not in (*secrets, "CANARY_PUBLIC_HOST")}
    run = subprocess.run(
        command, capture_output=True, text=True, env={**env, **secrets, "BLUE_TAG": "v3", "GREEN_TAG": "v4"}
    )
    assert run.returncode == 0, run.stderr
    resolved = yaml.safe_load(run.stdout)["services"]
    assert (resolved["blue"]["image"], resolved["green"]["image"]) == ("digits-service:v3", "digits-service:v4")
    assert resolved["green"]["environment"]["CANARY_SERVICE_SLOT"] == "green"
    assert resolved["green"]["environment"]["CANARY_SERVICE_CACHE_PASSWORD"] == secrets["CANARY_REDIS_PASSWORD"]
    assert resolved["blue"]["environment"]["CANARY_SERVICE_CACHE_HMAC_KEY"] == secrets["CANARY_CACHE_HMAC_KEY"]
    assert resolved["redis"]["environment"]["REDISCLI_AUTH"] == secrets["CANARY_REDIS_PASSWORD"]
    assert secrets["CANARY_REDIS_PASSWORD"] not in " ".join(resolved["redis"]["command"])  # not in `ps`
    assert resolved["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == secrets["CANARY_GRAFANA_PASSWORD"]
    # every published port on the host's loopback, nginx's public ones included, unless told otherwise
    published = [port for service in resolved.values() for port in service.get("ports", ())]
    assert published and all(str(port).startswith("127.0.0.1:") for port in published), published
    told = subprocess.run(command, capture_output=True, text=True,
                          env={**env, **secrets, "BLUE_TAG": "v3", "GREEN_TAG": "v4", "CANARY_PUBLIC_HOST": "0.0.0.0"})  # fmt: skip
    assert told.returncode == 0, told.stderr
    nginx_ports = {str(port) for port in yaml.safe_load(told.stdout)["services"]["nginx"]["ports"]}
    assert nginx_ports == {"0.0.0.0:8080:8080/tcp", "0.0.0.0:8081:8081/tcp", "127.0.0.1:8079:8079/tcp"}
    missing = subprocess.run(command, capture_output=True, text=True, env={**env, **secrets, "GREEN_TAG": "v4"})
    assert missing.returncode != 0 and "set BLUE_TAG" in missing.stderr
    tags = {"BLUE_TAG": "v3", "GREEN_TAG": "v4"}
    for secret in secrets:  # no Redis without a password, no slot without the signing key, no admin/admin
        unset = {key: value for key, value in secrets.items() if key != secret}
        missing = subprocess.run(command, capture_output=True, text=True, env={**env, **unset, **tags})
        assert missing.returncode != 0 and f"set {secret}" in missing.stderr
