"""deploy/k8s: every overlay rendered by a real kustomize and checked against the official
Kubernetes schemas (kubernetes-validate); the Gateway API objects, which those schemas lack,
checked structurally against the rendered Services; and deploy/k8s_plan.py's exact patch
bodies against recorded API objects (tests/testdata/k8s)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deploy import k8s_plan
from deploy.k8s_plan import MERGE_PATCH, STRATEGIC_MERGE_PATCH, K8sPatch
from tests.support.k8s import merge_patch
from tests.support.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
RECORDED = ROOT / "tests" / "testdata" / "k8s"
OVERLAYS = ("dev", "prod", "ingress-nginx")
# Oldest cluster the manifests target (native gRPC probes, autoscaling/v2, policy/v1) and the
# newest schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29", "1.37")
GATEWAY_KINDS = {"Gateway", "HTTPRoute", "GRPCRoute"}


def kustomize_command() -> list[str]:
    """A real kustomize: the standalone binary, else the one built into kubectl."""
    renderer = require_tool("kustomize", "kubectl", installs="kubectl, which ships kustomize")
    return [renderer, "build"] if Path(renderer).name == "kustomize" else [renderer, "kustomize"]


@functools.cache
def _rendered(name: str) -> str:
    run = subprocess.run([*kustomize_command(), str(K8S / "overlays" / name)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout


def render(name: str) -> list[dict[str, Any]]:
    """The overlay's objects, rendered once per session, parsed fresh for each caller."""
    return [doc for doc in yaml.safe_load_all(_rendered(name)) if doc]


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def recorded(name: str) -> dict[str, Any]:
    return json.loads((RECORDED / f"{name}.json").read_text())


def validate(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


# -- rendered manifests ------------------------------------------------------------------


def test_every_rendered_object_passes_the_official_schemas(overlay):
    name, docs = overlay
    unchecked = set()
    for doc in docs:
        if doc["kind"] in GATEWAY_KINDS:
            continue  # CRDs: not in the core schemas, see test_gateway_routes_point_at_rendered_services
        for version in KUBERNETES_VERSIONS:
            try:
                validate(doc, version)
            except kubernetes_validate.SchemaNotFoundError:
                unchecked.add(doc["kind"])
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']} (k8s {version}): {exc}")
    assert not unchecked, f"{name}: no schema for {sorted(unchecked)}"
    assert {doc["metadata"].get("namespace") for doc in docs if doc["kind"] != "Namespace"} == {
        by_kind(docs, "Namespace").popitem()[0]
    }


def test_the_schema_check_rejects_a_broken_manifest(overlay):
    _, docs = overlay
    deployment = copy.deepcopy(by_kind(docs, "Deployment")["digits-blue"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["startupProbe"]["grpc"]["port"] = "grpc"  # the grpc probe takes a number only
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment, KUBERNETES_VERSIONS[0])
    container["startupProbe"]["grpc"]["port"] = 50051
    container["readinesProbe"] = container.pop("readinessProbe")  # a typo, strict mode
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment, KUBERNETES_VERSIONS[0])


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_each_slot_has_its_own_deployment_service_hpa_and_pdb(overlay):
    _, docs = overlay
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    hpas, pdbs = by_kind(docs, "HorizontalPodAutoscaler"), by_kind(docs, "PodDisruptionBudget")
    for slot, other in (("blue", "green"), ("green", "blue")):
        name = f"digits-{slot}"
        pods = deployments[name]["spec"]["template"]["metadata"]["labels"]
        other_pods = deployments[f"digits-{other}"]["spec"]["template"]["metadata"]["labels"]
        assert pods["bento-canary/slot"] == slot
        for selector in (
            services[name]["spec"]["selector"],
            deployments[name]["spec"]["selector"]["matchLabels"],
            pdbs[name]["spec"]["selector"]["matchLabels"],
        ):
            assert _selects(selector, pods) and not _selects(selector, other_pods)
        assert hpas[name]["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert hpas[name]["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        assert "replicas" not in deployments[name]["spec"]  # the HPA owns it
        assert {(p["name"], p["port"]) for p in services[name]["spec"]["ports"]} == {
            ("http", 3000),
            ("v2", 8000),
            ("grpc", 50051),
        }
    assert set(services) >= {"redis"} and set(deployments) >= {"redis"}


def test_slot_pods_probe_health_expose_metrics_and_run_locked_down(overlay):
    _, docs = overlay
    for name in ("digits-blue", "digits-green"):
        template = by_kind(docs, "Deployment")[name]["spec"]["template"]
        (bento,) = template["spec"]["containers"]
        assert {(p["name"], p["containerPort"]) for p in bento["ports"]} == {
            ("http", 3000),
            ("v2", 8000),
            ("grpc", 50051),
        }
        assert bento["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
        assert bento["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
        assert bento["startupProbe"]["grpc"] == {"port": 50051}
        env = {item["name"]: item for item in bento["env"]}
        assert env["CANARY_SERVICE_GRPC_HOST"]["value"] == "0.0.0.0"
        assert env["CANARY_SERVICE_GRPC_PORT"]["value"] == "50051"
        assert env["CANARY_SERVICE_REST_PORT"]["value"] == "8000"
        assert env["CANARY_SERVICE_CACHE_URL"]["value"] == "redis://redis:6379/0"
        assert (
            env["CANARY_SERVICE_SLOT"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['bento-canary/slot']"
        )
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "3000"
    for deployment in by_kind(docs, "Deployment").values():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert isinstance(pod["securityContext"]["runAsUser"], int) and pod["securityContext"]["runAsUser"] > 0
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert set(container["resources"]) == {"requests", "limits"}


def test_redis_and_the_slots_take_the_cache_password_and_key_from_one_secret(overlay):
    _, docs = overlay
    deployments = by_kind(docs, "Deployment")

    def secret_env(container: dict[str, Any]) -> dict[str, dict[str, str]]:
        refs = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in container["env"]}
        return {name: ref for name, ref in refs.items() if ref}

    (redis,) = deployments["redis"]["spec"]["template"]["spec"]["containers"]
    assert secret_env(redis) == {"REDISCLI_AUTH": {"name": "bento-canary-cache", "key": "redis-password"}}
    assert "requirepass" in redis["command"][-1] and "$REDISCLI_AUTH" in redis["command"][-1]  # not in argv
    for slot in ("blue", "green"):
        (bento,) = deployments[f"digits-{slot}"]["spec"]["template"]["spec"]["containers"]
        assert secret_env(bento) == {
            "CANARY_SERVICE_CACHE_PASSWORD": {"name": "bento-canary-cache", "key": "redis-password"},
            "CANARY_SERVICE_CACHE_HMAC_KEY": {"name": "bento-canary-cache", "key": "hmac-key"},
        }


def test_overlays_size_and_tag_the_slots_differently():
    sizes = {}
    for name in ("dev", "prod"):
        docs = render(name)
        deployments, hpas = by_kind(docs, "Deployment"), by_kind(docs, "HorizontalPodAutoscaler")
        images = {slot: deployments[f"digits-{slot}"]["spec"]["template"]["spec"]["containers"][0]["image"]
                  for slot in ("blue", "green")}  # fmt: skip
        limits = deployments["digits-blue"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        sizes[name] = (
            images,
            hpas["digits-blue"]["spec"]["minReplicas"],
            hpas["digits-blue"]["spec"]["maxReplicas"],
            limits,
        )
    assert sizes["dev"][0] == {"blue": "digits-service:v1", "green": "digits-service:v1"}
    assert all(
        image.startswith("registry.example.com/bento-canary/digits-service:v") for image in sizes["prod"][0].values()
    )
    assert (sizes["dev"][1], sizes["dev"][2]) == (1, 2) and (sizes["prod"][1], sizes["prod"][2]) == (3, 12)
    assert sizes["dev"][3] != sizes["prod"][3]


def test_gateway_routes_point_at_rendered_services():
    """Structural Gateway API checks (the CRD schemas are not in kubernetes-validate)."""
    for name in ("dev", "prod"):
        docs = render(name)
        services, (gateway,) = by_kind(docs, "Service"), by_kind(docs, "Gateway").values()
        listeners = {listener["name"]: listener for listener in gateway["spec"]["listeners"]}
        for kind, port_name in (("HTTPRoute", "http"), ("GRPCRoute", "grpc")):
            route = by_kind(docs, kind)["digits"]
            assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
            (parent,) = route["spec"]["parentRefs"]
            assert parent["name"] == gateway["metadata"]["name"]
            assert listeners[parent["sectionName"]]["allowedRoutes"]["kinds"] == [{"kind": kind}]
            for rule in route["spec"]["rules"]:
                for ref in rule["backendRefs"]:
                    ports = {p["name"]: p for p in services[ref["name"]]["spec"]["ports"]}
                    assert ref["port"] == ports[port_name]["port"]
                    assert isinstance(ref.get("weight", 1), int) and 0 <= ref.get("weight", 1) <= 1_000_000
                for match in rule.get("matches", []):
                    for header in match.get("headers", []):
                        assert header["type"] == "Exact" and header["name"] == "x-canary"
        by_name = {p["name"]: p for p in services["digits-blue"]["spec"]["ports"]}
        assert by_name["grpc"]["appProtocol"] == "kubernetes.io/h2c"
        slots = [by_kind(docs, "Deployment")[f"digits-{slot}"] for slot in ("blue", "green")]
        status = k8s_plan.read_status(slots, by_kind(docs, "HTTPRoute")["digits"], by_kind(docs, "GRPCRoute")["digits"])
        # The planner understands the shipped routes: blue stable, green idle candidate.
        assert (status["stable"], status["candidate"], status["weight"], status["consistent"]) == (
            "blue",
            "green",
            0,
            True,
        )


def test_the_http_route_passes_only_the_api_paths():
    """/metrics, the docs and BentoML's UI share port 3000 with the API: the Gateway must
    not reach them. Every rule matches /v2 (prefix) and /classify only; the planner still
    reads and patches the routes (a weight change keeps the matches)."""
    for name in ("dev", "prod"):
        docs = render(name)
        http, grpc = by_kind(docs, "HTTPRoute")["digits"], by_kind(docs, "GRPCRoute")["digits"]
        for rule in http["spec"]["rules"]:
            paths = {(m["path"]["type"], m["path"]["value"]) for m in rule["matches"]}
            assert paths == {("PathPrefix", "/v2"), ("Exact", "/classify")}, rule
        (patch, _) = k8s_plan.plan_weight(
            http, grpc, "blue", "green", 10, [recorded("deployment-blue"), recorded("deployment-green")]
        ).patches
        assert [rule["matches"] for rule in patch.payload()["spec"]["rules"]] == [
            rule["matches"] for rule in http["spec"]["rules"]
        ]


def test_ingress_nginx_variant_has_main_and_canary_ingresses_and_no_gateway_objects():
    docs = render("ingress-nginx")
    assert not GATEWAY_KINDS & {doc["kind"] for doc in docs}
    ingresses = by_kind(docs, "Ingress")
    for main, canary, port in (("digits", "digits-canary", "http"), ("digits-grpc", "digits-grpc-canary", "grpc")):
        main_backend = ingresses[main]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        canary_backend = ingresses[canary]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        assert main_backend == {"name": "digits-blue", "port": {"name": port}}
        assert canary_backend == {"name": "digits-green", "port": {"name": port}}
        annotations = ingresses[canary]["metadata"]["annotations"]
        assert annotations["nginx.ingress.kubernetes.io/canary"] == "true"
        assert annotations["nginx.ingress.kubernetes.io/canary-weight"] == "0"
        assert annotations["nginx.ingress.kubernetes.io/canary-by-header"] == "x-canary"
        assert "nginx.ingress.kubernetes.io/canary" not in ingresses[main]["metadata"].get("annotations", {})
        assert ingresses[main]["spec"]["rules"][0]["host"] == ingresses[canary]["spec"]["rules"][0]["host"]
    assert ingresses["digits-grpc"]["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"


# -- exposure: who reaches the pods, TLS at the edge --------------------------------------

NAMESPACE_LABEL = "kubernetes.io/metadata.name"  # every namespace carries its own name as a label
PROMETHEUS = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
GATEWAYS = {  # the proxy pods of each traffic component, as their usual installs label them
    "gateway-api": ("envoy-gateway-system", {"app.kubernetes.io/name": "envoy",
                                             "gateway.envoyproxy.io/owning-gateway-name": "bento-canary"}),
    "ingress-nginx": ("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx",
                                        "app.kubernetes.io/component": "controller"}),
}  # fmt: skip


def _selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # what the evaluator below understands
    return _selects(selector.get("matchLabels", {}), labels)


def admits(policies: list[dict[str, Any]], pod: tuple[str, dict[str, str]], peer: tuple[str, dict[str, str]],
           port: str) -> bool:  # fmt: skip
    """Would NetworkPolicy let `peer` (namespace, labels) connect to `pod` on its named `port`?
    A pod no policy selects admits everything; selected, only what some rule allows."""
    (namespace, labels), (peer_namespace, peer_labels) = pod, peer
    selecting = [p for p in policies if _selector_matches(p["spec"]["podSelector"], labels)]
    rules = [rule for p in selecting if "Ingress" in p["spec"]["policyTypes"] for rule in p["spec"].get("ingress", [])]
    for rule in rules:
        if "ports" in rule and port not in {item["port"] for item in rule["ports"]}:
            continue
        for item in rule.get("from", [{"namespaceSelector": {}}]):  # no `from`: every source
            assert "ipBlock" not in item, item
            in_namespace = (
                _selector_matches(item["namespaceSelector"], {NAMESPACE_LABEL: peer_namespace})
                if "namespaceSelector" in item
                else peer_namespace == namespace
            )
            if in_namespace and _selector_matches(item.get("podSelector", {}), peer_labels):
                return True
    return not selecting


def test_network_policies_let_only_the_gateway_reach_the_slots_and_only_the_slots_reach_redis(overlay):
    name, docs = overlay
    policies = list(by_kind(docs, "NetworkPolicy").values())
    namespace = by_kind(docs, "Namespace").popitem()[0]
    deployments = by_kind(docs, "Deployment")
    pods = {pod: (namespace, deployments[pod]["spec"]["template"]["metadata"]["labels"]) for pod in deployments}
    component = "ingress-nginx" if name == "ingress-nginx" else "gateway-api"
    gateway, (other_gateway,) = GATEWAYS[component], [peer for key, peer in GATEWAYS.items() if key != component]
    stranger_here, stranger_elsewhere = (namespace, {"app": "debug"}), ("default", {"app": "debug"})
    for pod in deployments:  # every pod is isolated: what no policy allows is refused
        assert any(_selector_matches(p["spec"]["podSelector"], pods[pod][1]) for p in policies), pod
    for slot, other_slot in (("digits-blue", "digits-green"), ("digits-green", "digits-blue")):
        assert admits(policies, pods[slot], gateway, "http") and admits(policies, pods[slot], gateway, "grpc")
        assert admits(policies, pods[slot], PROMETHEUS, "http"), "metrics stay scrapeable on the slots"
        assert not admits(policies, pods[slot], PROMETHEUS, "grpc")
        for peer in (other_gateway, stranger_here, stranger_elsewhere, pods["redis"], pods[other_slot]):
            assert not any(admits(policies, pods[slot], peer, port) for port in ("http", "v2", "grpc")), (slot, peer)
        assert admits(policies, pods["redis"], pods[slot], "redis")
    for peer in (gateway, PROMETHEUS, stranger_here, stranger_elsewhere):
        assert not admits(policies, pods["redis"], peer, "redis"), peer
    for policy in policies:  # every named port a policy opens is one the pods it selects have
        for deployment in deployments.values():
            template = deployment["spec"]["template"]
            if _selector_matches(policy["spec"]["podSelector"], template["metadata"]["labels"]):
                named = {port["name"] for c in template["spec"]["containers"] for port in c["ports"]}
                opened = {item["port"] for rule in policy["spec"]["ingress"] for item in rule["ports"]}
                assert opened <= named, (policy["metadata"]["name"], opened - named)


def test_the_gateway_terminates_tls_on_every_listener():
    for name in ("dev", "prod"):
        (gateway,) = by_kind(render(name), "Gateway").values()
        for listener in gateway["spec"]["listeners"]:
            assert listener["protocol"] == "HTTPS", (name, listener["name"])
            assert listener["tls"] == {
                "mode": "Terminate",
                "certificateRefs": [{"kind": "Secret", "name": "bento-canary-tls"}],
            }


def test_the_scrape_configmap_is_a_valid_prometheus_config(tmp_path):
    """promtool checks the job (relabel rules, RE2 regexes...). Debian builds Prometheus
    without Kubernetes service discovery, so its one `kubernetes_sd_configs` stanza is checked
    here and swapped for an empty static target list before promtool sees the file."""
    promtool = require_tool("promtool", installs="prometheus, which ships promtool")
    (configmap,) = [doc for doc in render("dev") if doc["kind"] == "ConfigMap"]
    config = yaml.safe_load(configmap["data"]["bento-canary.yml"])
    (job,) = config["scrape_configs"]
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    job["static_configs"] = [{"targets": []}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    run = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    relabeled = {rule.get("target_label") for rule in job["relabel_configs"]}
    assert {"__address__", "__metrics_path__", "slot", "component"} <= relabeled


# -- the planner against recorded API objects ---------------------------------------------


@pytest.fixture
def cluster() -> dict[str, Any]:
    """Mid-canary: blue stable on v3, green candidate on v4 at 10%."""
    return {
        "http": recorded("httproute"),
        "grpc": recorded("grpcroute"),
        "blue": recorded("deployment-blue"),
        "green": recorded("deployment-green"),
    }


def applied(cluster: dict[str, Any], plan: k8s_plan.K8sPlan) -> dict[str, Any]:
    """The routes after the plan's merge patches (Deployments are not patched by route plans)."""
    after = dict(cluster)
    for patch in plan.patches:
        assert patch.patch_type == MERGE_PATCH
        key = {"HTTPRoute": "http", "GRPCRoute": "grpc"}[patch.kind]
        after[key] = merge_patch(cluster[key], patch.payload())
    return after


def status(cluster: dict[str, Any]) -> dict[str, Any]:
    return k8s_plan.read_status([cluster["blue"], cluster["green"]], cluster["http"], cluster["grpc"])


def http_ref(service: str, weight: int) -> dict[str, Any]:
    return {"name": service, "port": 3000, "group": "", "kind": "Service", "weight": weight}


def grpc_ref(service: str, weight: int) -> dict[str, Any]:
    return {"name": service, "port": 50051, "group": "", "kind": "Service", "weight": weight}


def http_rule(header: str | None, refs: list[dict[str, Any]]) -> dict[str, Any]:
    match: dict[str, Any] = {"path": {"type": "PathPrefix", "value": "/"}}
    if header:
        match = {"headers": [{"name": "x-canary", "type": "Exact", "value": header}], **match}
    return {"backendRefs": refs, "matches": [match], "timeouts": {"request": "30s"}}


def grpc_rule(header: str | None, refs: list[dict[str, Any]]) -> dict[str, Any]:
    if header is None:
        return {"backendRefs": refs}
    return {"backendRefs": refs, "matches": [{"headers": [{"name": "x-canary", "type": "Exact", "value": header}]}]}


def test_read_status_reports_slots_images_replicas_and_weights(cluster):
    assert status(cluster) == {
        "stable": "blue",
        "candidate": "green",
        "weight": 10,
        "grpc_weight": 10,
        "consistent": True,
        "shadow": False,
        "slots": {
            "blue": {
                "role": "stable", "weight": 90, "grpc_weight": 90, "deployment": "digits-blue",
                "image": "registry.example.com/bento-canary/digits-service:v3", "model_version": 3,
                "replicas": 3, "ready_replicas": 3, "updated_replicas": 3, "rollout_complete": True,
            },
            "green": {
                "role": "candidate", "weight": 10, "grpc_weight": 10, "deployment": "digits-green",
                "image": "registry.example.com/bento-canary/digits-service:v4", "model_version": 4,
                "replicas": 3, "ready_replicas": 3, "updated_replicas": 3, "rollout_complete": True,
            },
        },
    }  # fmt: skip


def test_weight_patches_both_routes_with_exact_merge_patch_bodies(cluster):
    plan = k8s_plan.plan_weight(
        cluster["http"], cluster["grpc"], "blue", "green", 25, [cluster["blue"], cluster["green"]]
    )
    http, grpc = plan.patches
    assert (http.kind, http.name, http.namespace, http.patch_type) == (
        "HTTPRoute",
        "digits",
        "bento-canary",
        MERGE_PATCH,
    )
    assert http.api_version == "gateway.networking.k8s.io/v1"
    assert http.payload() == {
        "metadata": {"resourceVersion": "48213"},
        "spec": {
            "rules": [
                http_rule("always", [http_ref("digits-green", 1)]),
                http_rule("never", [http_ref("digits-blue", 1)]),
                http_rule(None, [http_ref("digits-blue", 75), http_ref("digits-green", 25)]),
            ]
        },
    }
    assert (grpc.kind, grpc.name, grpc.namespace, grpc.patch_type) == (
        "GRPCRoute",
        "digits",
        "bento-canary",
        MERGE_PATCH,
    )
    assert grpc.payload() == {
        "metadata": {"resourceVersion": "48214"},
        "spec": {
            "rules": [
                grpc_rule("always", [grpc_ref("digits-green", 1)]),
                grpc_rule("never", [grpc_ref("digits-blue", 1)]),
                grpc_rule(None, [grpc_ref("digits-blue", 75), grpc_ref("digits-green", 25)]),
            ]
        },
    }
    after = status(applied(cluster, plan))
    assert (after["weight"], after["grpc_weight"], after["stable"]) == (25, 25, "blue")
    assert plan.summary == "candidate green 10% -> 25% (stable blue 75%)"


def test_setting_the_current_weight_plans_no_patch(cluster):
    plan = k8s_plan.plan_weight(
        cluster["http"], cluster["grpc"], "blue", "green", 10, [cluster["blue"], cluster["green"]]
    )
    assert plan.patches == ()
    assert "  nothing to patch" in plan.describe()


def test_a_hand_edited_grpc_route_is_brought_back_in_line(cluster):
    for ref in cluster["grpc"]["spec"]["rules"][2]["backendRefs"]:
        ref["weight"] = 1  # someone split gRPC 50/50 by hand
    assert status(cluster)["consistent"] is False
    plan = k8s_plan.plan_weight(
        cluster["http"], cluster["grpc"], "blue", "green", 10, [cluster["blue"], cluster["green"]]
    )
    assert [patch.kind for patch in plan.patches] == ["GRPCRoute"]
    assert status(applied(cluster, plan))["consistent"] is True


@pytest.mark.parametrize(
    ("stable", "candidate", "weight", "message"),
    [
        ("blue", "green", 101, "weight must be a whole number from 0 to 100, got 101"),
        ("blue", "green", -1, "weight must be a whole number from 0 to 100, got -1"),
        ("blue", "green", 2.5, "weight must be a whole number from 0 to 100, got 2.5"),
        ("blue", "green", "25", "weight must be a whole number from 0 to 100, got '25'"),
        ("blue", "green", True, "weight must be a whole number from 0 to 100, got True"),
        ("red", "green", 5, "unknown slot 'red' (expected blue or green)"),
        ("blue", "purple", 5, "unknown slot 'purple' (expected blue or green)"),
        ("blue", "blue", 5, "stable and candidate must be different slots, got blue for both"),
        ("green", "blue", 5, "the routes have stable=blue candidate=green, not stable=green candidate=blue; "
                             "use switch or promote to change roles"),
    ],
)  # fmt: skip
def test_bad_weight_requests_are_one_line_errors(cluster, stable, candidate, weight, message):
    with pytest.raises(ValueError) as caught:
        k8s_plan.plan_weight(
            cluster["http"], cluster["grpc"], stable, candidate, weight, [cluster["blue"], cluster["green"]]
        )
    assert str(caught.value) == message and "\n" not in message


def test_rollback_sends_everything_to_stable_and_keeps_roles(cluster):
    plan = k8s_plan.plan_rollback(cluster["http"], cluster["grpc"])
    http, _ = plan.patches
    assert http.payload()["spec"]["rules"][2]["backendRefs"] == [
        http_ref("digits-blue", 100),
        http_ref("digits-green", 0),
    ]
    after = status(applied(cluster, plan))
    assert (after["stable"], after["candidate"], after["weight"], after["grpc_weight"]) == ("blue", "green", 0, 0)


def test_switch_swaps_roles_and_a_second_switch_goes_back(cluster):
    plan = k8s_plan.plan_switch(cluster["http"], cluster["grpc"], [cluster["blue"], cluster["green"]])
    http, grpc = plan.patches
    assert http.payload() == {
        "metadata": {"resourceVersion": "48213"},
        "spec": {
            "rules": [
                http_rule("always", [http_ref("digits-blue", 1)]),
                http_rule("never", [http_ref("digits-green", 1)]),
                http_rule(None, [http_ref("digits-blue", 0), http_ref("digits-green", 100)]),
            ]
        },
    }
    assert grpc.payload()["spec"]["rules"][2]["backendRefs"] == [
        grpc_ref("digits-blue", 0),
        grpc_ref("digits-green", 100),
    ]
    switched = applied(cluster, plan)
    assert (status(switched)["stable"], status(switched)["weight"]) == ("green", 0)
    back = applied(
        switched, k8s_plan.plan_switch(switched["http"], switched["grpc"], [cluster["blue"], cluster["green"]])
    )
    assert (status(back)["stable"], status(back)["candidate"], status(back)["weight"]) == ("blue", "green", 0)


MIRROR_GREEN = {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "digits-green", "port": 3000}}}


def test_shadow_mirrors_the_weighted_rest_rule_to_the_candidate_and_off_again(cluster):
    cluster["http"]["spec"]["rules"][2]["filters"] = [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {}}]
    plan = k8s_plan.plan_shadow(cluster["http"], cluster["grpc"], True, [cluster["blue"], cluster["green"]])
    (http,) = plan.patches  # the GRPCRoute is never mirrored
    assert http.kind == "HTTPRoute" and http.payload()["metadata"] == {"resourceVersion": "48213"}
    rules = http.payload()["spec"]["rules"]
    assert rules[2]["filters"] == [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {}}, MIRROR_GREEN]
    assert all("filters" not in rule for rule in rules[:2])  # forced requests are never mirrored
    assert [ref["weight"] for ref in rules[2]["backendRefs"]] == [90, 10]  # weights stay
    mirrored = applied(cluster, plan)
    assert status(mirrored)["shadow"] is True
    assert (
        k8s_plan.plan_shadow(mirrored["http"], mirrored["grpc"], True, [mirrored["blue"], mirrored["green"]]).patches
        == ()
    )
    off = applied(mirrored, k8s_plan.plan_shadow(mirrored["http"], mirrored["grpc"], False, []))
    assert off["http"]["spec"]["rules"][2]["filters"] == [
        {"type": "ResponseHeaderModifier", "responseHeaderModifier": {}}
    ]
    assert status(off)["shadow"] is False


def test_a_weight_change_keeps_the_mirror_and_rollback_or_a_role_change_stops_it(cluster):
    """As on the local stack: mirroring follows the candidate only until traffic is rolled
    back or the roles change (after a switch the mirror would copy stable's traffic to itself)."""
    mirrored = applied(
        cluster, k8s_plan.plan_shadow(cluster["http"], cluster["grpc"], True, [cluster["blue"], cluster["green"]])
    )
    weighted = applied(
        mirrored,
        k8s_plan.plan_weight(
            mirrored["http"], mirrored["grpc"], "blue", "green", 40, [mirrored["blue"], mirrored["green"]]
        ),
    )
    assert status(weighted)["shadow"] is True and status(weighted)["weight"] == 40
    deployments = [cluster["blue"], cluster["green"]]
    for plan in (
        k8s_plan.plan_rollback(weighted["http"], weighted["grpc"]),
        k8s_plan.plan_switch(weighted["http"], weighted["grpc"], deployments),
        k8s_plan.plan_promote(weighted["http"], weighted["grpc"], deployments),
    ):
        after = applied(weighted, plan)
        assert "filters" not in after["http"]["spec"]["rules"][2], plan.action
        assert status(after)["shadow"] is False


def test_switch_and_promote_refuse_a_candidate_without_ready_pods(cluster):
    cluster["green"]["status"]["readyReplicas"] = 0
    for plan in (k8s_plan.plan_switch, k8s_plan.plan_promote):
        with pytest.raises(
            ValueError, match=r"^cannot (switch|promote): slot green \(digits-green\) has no ready replica$"
        ):
            plan(cluster["http"], cluster["grpc"], [cluster["blue"], cluster["green"]])


@pytest.mark.parametrize(
    ("status", "progress"),
    [
        # a surge pod of the new image is up; the three old ones still serve the slot
        ({"replicas": 4, "updatedReplicas": 1, "readyReplicas": 4}, "1 of 3 pods updated, 3 old still serving"),
        # stuck: the new pods crash-loop, maxUnavailable 0 keeps every old pod ready
        ({"replicas": 5, "updatedReplicas": 2, "readyReplicas": 3}, "2 of 3 pods updated, 3 old still serving"),
        # the image was just patched: the controller has not looked yet
        ({"observedGeneration": 5}, "the Deployment controller has not yet picked up its new spec"),
    ],
)
def test_traffic_never_moves_to_a_slot_still_rolling_out(cluster, status, progress):
    """Old pods stay ready while a rollout runs, so readiness alone would send the candidate's
    traffic (or a promotion) to the image it is leaving."""
    cluster["green"]["status"].update(status)
    deployments = [cluster["blue"], cluster["green"]]
    refused = (
        lambda: k8s_plan.plan_weight(cluster["http"], cluster["grpc"], "blue", "green", 1, deployments),
        lambda: k8s_plan.plan_switch(cluster["http"], cluster["grpc"], deployments),
        lambda: k8s_plan.plan_promote(cluster["http"], cluster["grpc"], deployments),
        lambda: k8s_plan.plan_shadow(cluster["http"], cluster["grpc"], True, deployments),
    )
    for plan in refused:
        with pytest.raises(ValueError) as error:
            plan()
        assert str(error.value).startswith("cannot ") and "\n" not in str(error.value)
        image = "registry.example.com/bento-canary/digits-service:v4"
        assert f"slot green (digits-green) is still rolling out to {image} ({progress})" in str(error.value)
    assert (
        k8s_plan.read_status(deployments, cluster["http"], cluster["grpc"])["slots"]["green"]["rollout_complete"]
        is False
    )
    back = k8s_plan.plan_weight(cluster["http"], cluster["grpc"], "blue", "green", 0, deployments)
    assert back.summary == "candidate green 10% -> 0% (stable blue 100%)"  # a rollback needs nothing


def test_a_slot_scaling_up_with_only_current_pods_may_take_traffic(cluster):
    """The HPA raised replicas from 3 to 5 and two pods are still being created (or a quota
    holds them back): no old pod answers for the slot, so this is no rollout to wait for."""
    cluster["green"]["spec"]["replicas"] = 5
    cluster["green"]["metadata"]["generation"] = cluster["green"]["status"]["observedGeneration"] = 7
    deployments = [cluster["blue"], cluster["green"]]
    plan = k8s_plan.plan_weight(cluster["http"], cluster["grpc"], "blue", "green", 50, deployments)
    assert plan.summary == "candidate green 10% -> 50% (stable blue 50%)"
    k8s_plan.plan_promote(cluster["http"], cluster["grpc"], deployments)
    shown = k8s_plan.read_status(deployments, cluster["http"], cluster["grpc"])["slots"]["green"]
    assert shown["rollout_complete"] is False  # as kubectl says: 3 of 5 wanted pods exist


def test_promote_makes_the_candidate_stable_and_refuses_when_both_run_one_image(cluster):
    deployments = [cluster["blue"], cluster["green"]]
    plan = k8s_plan.plan_promote(cluster["http"], cluster["grpc"], deployments)
    assert plan.summary == ("green (registry.example.com/bento-canary/digits-service:v4) becomes stable at 100%, "
                            "blue idle candidate at 0%")  # fmt: skip
    assert [p.payload() for p in plan.patches] == [
        p.payload() for p in k8s_plan.plan_switch(cluster["http"], cluster["grpc"], deployments).patches
    ]
    cluster["green"]["spec"]["template"]["spec"]["containers"][0]["image"] = (
        "registry.example.com/bento-canary/digits-service:v3"
    )
    with pytest.raises(ValueError, match="^nothing to promote: blue and green both run .*:v3$"):
        k8s_plan.plan_promote(cluster["http"], cluster["grpc"], deployments)


def test_deploy_sets_the_slot_image_with_an_exact_strategic_merge_patch(cluster):
    rolled_back = applied(cluster, k8s_plan.plan_rollback(cluster["http"], cluster["grpc"]))
    image = k8s_plan.image_for_version(cluster["green"], 5)
    assert image == "registry.example.com/bento-canary/digits-service:v5"
    plan = k8s_plan.plan_deploy(cluster["green"], image, routes=[rolled_back["http"], rolled_back["grpc"]])
    (patch,) = plan.patches
    assert patch == K8sPatch(
        "Deployment", "digits-green", "bento-canary", STRATEGIC_MERGE_PATCH,
        {"spec": {"template": {"spec": {"containers": [{"name": "bento", "image": image}]}}}},
    )  # fmt: skip
    assert patch.api_version == "apps/v1"
    assert plan.summary == "green registry.example.com/bento-canary/digits-service:v4 -> " + image
    assert (
        k8s_plan.plan_deploy(
            cluster["green"], cluster["green"]["spec"]["template"]["spec"]["containers"][0]["image"]
        ).patches
        == ()
    )


def test_deploy_refuses_a_slot_that_serves_traffic_and_bad_input(cluster):
    routes = [cluster["http"], cluster["grpc"]]
    with pytest.raises(
        ValueError, match="^slot green gets 10% of HTTPRoute traffic; deploy to the idle slot or roll back first$"
    ):
        k8s_plan.plan_deploy(cluster["green"], "digits-service:v5", routes=routes)
    with pytest.raises(ValueError, match="^slot blue gets 90% of HTTPRoute traffic"):
        k8s_plan.plan_deploy(cluster["blue"], "digits-service:v5", routes=routes)
    with pytest.raises(ValueError, match="^not an image reference: 'digits service:v5'$"):
        k8s_plan.plan_deploy(cluster["green"], "digits service:v5")
    del cluster["green"]["metadata"]["labels"]["bento-canary/slot"]
    with pytest.raises(ValueError, match="^Deployment digits-green has no bento-canary/slot label$"):
        k8s_plan.plan_deploy(cluster["green"], "digits-service:v5")
    with pytest.raises(ValueError, match="^model version must be a positive whole number, got 0$"):
        k8s_plan.image_for_version(cluster["blue"], 0)


def test_a_route_without_the_owned_rules_is_refused(cluster):
    del cluster["http"]["spec"]["rules"][0]  # the x-canary: always rule
    with pytest.raises(ValueError, match="^HTTPRoute digits has no x-canary: always rule$"):
        k8s_plan.plan_rollback(cluster["http"], cluster["grpc"])
    cluster["grpc"]["spec"]["rules"][2]["backendRefs"][0]["name"] = "redis"
    with pytest.raises(ValueError, match="^GRPCRoute digits sends traffic to 'redis', not a slot Service$"):
        k8s_plan.read_status([], recorded("httproute"), cluster["grpc"])


def test_plans_are_immutable_and_print_their_exact_requests(cluster):
    plan = k8s_plan.plan_weight(
        cluster["http"], cluster["grpc"], "blue", "green", 25, [cluster["blue"], cluster["green"]]
    )
    patch = plan.patches[0]
    with pytest.raises(TypeError):
        patch.body["spec"] = {}  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        patch.name = "other"  # type: ignore[misc]
    patch.payload()["spec"]["rules"].clear()  # a copy: the plan is unchanged
    assert len(patch.payload()["spec"]["rules"]) == 3
    lines = plan.describe()
    assert lines[0] == "weight: candidate green 10% -> 25% (stable blue 75%)"
    assert (
        lines[1] == "  PATCH gateway.networking.k8s.io/v1 HTTPRoute bento-canary/digits (application/merge-patch+json)"
    )
    assert json.loads(lines[2]) == patch.payload()


def test_recorded_objects_pass_the_official_schemas():
    for name in ("deployment-blue", "deployment-green"):
        validate(recorded(name), KUBERNETES_VERSIONS[-1])


# -- the manifests against the image `canary containerize` really built --------------------


@pytest.mark.slow
@pytest.mark.engine
def test_the_slot_deployment_fits_the_built_image(container_engine, served_image):
    """Ports, uid, health endpoints and writable paths of the slot pods, taken from the
    rendered manifest and checked against the image: its `docker image inspect` facts, then
    the image run as the pod would run it (the pod's user and env, a read-only root with
    tmpfs exactly at the pod's volume mounts), answering the pod's probes."""
    import os
    import time

    import grpc
    import httpx
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.support.containers import inspect

    pod = by_kind(render("dev"), "Deployment")["digits-blue"]["spec"]["template"]["spec"]
    (bento,) = pod["containers"]
    image = inspect(container_engine, served_image.image)["Config"]
    ports = {p["name"]: p["containerPort"] for p in bento["ports"]}
    assert {f"{port}/tcp" for port in ports.values()} == set(image["ExposedPorts"])
    assert image["User"] == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    assert bento["readinessProbe"]["httpGet"]["path"] in " ".join(image["Healthcheck"]["Test"])
    env = {item["name"]: item["value"] for item in bento["env"] if "value" in item}
    image_env = dict(item.split("=", 1) for item in image["Env"])
    assert env["BENTOML_HOME"] == image_env["BENTOML_HOME"]  # BentoML writes only there (and /tmp)

    name = f"canary-k8s-{os.getpid()}"
    # an emptyDir is writable by the pod's user (fsGroup); a tmpfs is made so with uid/gid
    owner = f"uid={pod['securityContext']['runAsUser']},gid={pod['securityContext']['fsGroup']}"
    mounts = [arg for mount in bento["volumeMounts"] for arg in ("--tmpfs", f"{mount['mountPath']}:{owner}")]
    envs = [arg for key, value in {**env, "CANARY_SERVICE_SLOT": "blue", "CANARY_SERVICE_CACHE_URL": ""}.items()
            for arg in ("--env", f"{key}={value}")]  # fmt: skip
    publish = [arg for port in ports.values() for arg in ("--publish", f"127.0.0.1::{port}")]
    user = f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    container_engine.run("run", "--detach", "--name", name, "--read-only", "--user", user, "--cap-drop", "ALL",
                         "--security-opt", "no-new-privileges", *mounts, *envs, *publish, served_image.image)  # fmt: skip
    try:
        bound = inspect(container_engine, name)["NetworkSettings"]["Ports"]
        address = {key: f"127.0.0.1:{bound[f'{port}/tcp'][0]['HostPort']}" for key, port in ports.items()}
        base = f"http://{address['http']}"
        readiness, liveness = bento["readinessProbe"]["httpGet"]["path"], bento["livenessProbe"]["httpGet"]["path"]
        deadline, ready = time.monotonic() + 240, None
        while time.monotonic() < deadline and ready != 200:
            state = inspect(container_engine, name)["State"]
            assert state["Status"] == "running", container_engine.run("logs", "--tail", "30", name)
            try:
                ready = httpx.get(base + readiness, timeout=2).status_code
            except httpx.HTTPError:
                ready = None
            if ready != 200:
                time.sleep(1)
        assert ready == 200, container_engine.run("logs", "--tail", "30", name)
        assert httpx.get(base + liveness, timeout=5).status_code == 200
        assert bento["startupProbe"]["grpc"]["port"] == ports["grpc"]
        with grpc.insecure_channel(address["grpc"]) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        container_engine.run("rm", "--force", name)
