"""Locust next to the stack, checked offline with the tools the stack's own manifests use:
deploy/k8s/locust rendered by a real kustomize and validated against the official
Kubernetes schemas; deploy/compose/locust.yaml against the compose-spec schema and resolved
together with compose.yaml by docker-compose; deploy/docker/Dockerfile.locust pinned to the
project's versions of everything the locustfile imports, and copying every file it needs."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.test_k8s import KUBERNETES_VERSIONS, by_kind, kustomize_command, validate
from tests.support.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
LOCUST_K8S = ROOT / "deploy" / "k8s" / "locust"
COMPOSE_DIR = ROOT / "deploy" / "compose"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile.locust"
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
MASTER_PORT, WEB_PORT = 5557, 8089


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict[str, Any]]:
    run = subprocess.run([*kustomize_command(), str(LOCUST_K8S)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc]


def test_the_locust_objects_pass_the_official_schemas(k8s_docs):
    assert {doc["kind"] for doc in k8s_docs} == {"Deployment", "Service", "NetworkPolicy"}
    for doc in k8s_docs:
        for version in KUBERNETES_VERSIONS:
            validate(doc, version)
    assert {doc["metadata"]["namespace"] for doc in k8s_docs} == {"bento-canary"}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_workers_find_their_master_through_its_service_and_scale_on_their_own(k8s_docs):
    deployments, services = by_kind(k8s_docs, "Deployment"), by_kind(k8s_docs, "Service")
    master, worker, service = deployments["locust-master"], deployments["locust-worker"], services["locust-master"]
    master_pods = master["spec"]["template"]["metadata"]["labels"]
    worker_pods = worker["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= master_pods.items()
    assert not service["spec"]["selector"].items() <= worker_pods.items()
    args = _container(worker)["args"]
    assert args[:1] == ["--worker"] and args[args.index("--master-host") + 1] == service["metadata"]["name"]
    assert int(args[args.index("--master-port") + 1]) == MASTER_PORT
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in _container(master)["ports"]}
    assert ports == container_ports == {"web": WEB_PORT, "master": MASTER_PORT}
    assert _container(master)["args"] == ["--master"] and master["spec"]["replicas"] == 1
    assert worker["spec"]["replicas"] >= 2  # `kubectl scale` changes only this
    assert _container(master)["image"] == _container(worker)["image"]
    env = {e["name"]: e["value"] for e in _container(master)["env"]}
    assert env["LOCUST_HOST"].startswith("https://") and "grpc" not in env["CANARY_LOADTEST_WEIGHTS"]


def test_locust_pods_run_locked_down_and_only_workers_reach_the_master(k8s_docs):
    for deployment in by_kind(k8s_docs, "Deployment").values():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        container = _container(deployment)
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert set(container["resources"]) == {"requests", "limits"}
    policies = by_kind(k8s_docs, "NetworkPolicy")
    (rule,) = policies["locust-master-from-workers"]["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "locust",
                                                             "app.kubernetes.io/component": "worker"}}}]  # fmt: skip
    assert rule["ports"] == [{"port": "master", "protocol": "TCP"}]
    assert "ingress" not in policies["locust-workers-closed"]["spec"]  # workers accept nothing


def test_the_locust_compose_file_matches_the_compose_spec_schema():
    run = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(COMPOSE_DIR / "locust.yaml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


def test_docker_compose_runs_locust_on_the_stacks_network_next_to_nginx():
    docker_compose = require_tool("docker-compose", installs="docker-compose")
    secrets = {"CANARY_REDIS_PASSWORD": "redis-pass-0123456789", "CANARY_CACHE_HMAC_KEY": "hmac-key-0123456789",
               "CANARY_GRAFANA_PASSWORD": "grafana-pass-0123456789", "BLUE_TAG": "v3", "GREEN_TAG": "v4"}  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "CANARY_LOADTEST_"))}
    command = [docker_compose, "-p", "bento-canary", "-f", str(COMPOSE_DIR / "compose.yaml"), "-f",
               str(COMPOSE_DIR / "locust.yaml"), "config"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, env={**env, **secrets, "LOCUST_WORKERS": "5"})
    assert run.returncode == 0, run.stderr
    services = yaml.safe_load(run.stdout)["services"]
    master, worker = services["locust-master"], services["locust-worker"]
    assert set(master["networks"]) == set(worker["networks"]) == set(services["nginx"]["networks"])
    host = master["command"][master["command"].index("--host") + 1]
    assert host == "http://nginx:8080" and "8080" in " ".join(map(str, services["nginx"]["ports"]))
    assert master["command"][master["command"].index("--grpc-host") + 1] == "nginx:8081"
    assert worker["command"][worker["command"].index("--master-host") + 1] == "locust-master"
    assert worker["deploy"]["replicas"] == 5 and worker["image"] == master["image"]
    assert [str(p) for p in master["ports"]] == [f"127.0.0.1:{WEB_PORT}:{WEB_PORT}/tcp"]  # web UI on loopback only
    assert "ports" not in worker and str(MASTER_PORT) in master["expose"]
    assert (
        master["build"]["dockerfile"] == "deploy/docker/Dockerfile.locust" and Path(master["build"]["context"]) == ROOT
    )


# -- the image -------------------------------------------------------------------------------

# import name -> the distribution the image installs for it
DISTRIBUTIONS = {"locust": "locust", "gevent": "gevent", "grpc": "grpcio", "numpy": "numpy", "scipy": "scipy",
                 "sklearn": "scikit-learn", "tritonclient": "tritonclient", "yaml": "pyyaml", "flask": "flask"}  # fmt: skip
LOCUST_DEPENDENCIES = {"gevent", "flask"}  # installed with locust itself


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (imports inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def project_closure(start: Path) -> tuple[set[Path], set[str]]:
    """(the project files `start` needs, the third-party top-level modules they import)."""
    files, third_party, todo = set(), set(), [start]
    while todo:
        path = todo.pop()
        if path in files:
            continue
        files.add(path)
        for name in _imports(path):
            top = name.split(".")[0]
            if top in ("loadtest", "models", "service", "deploy", "bench"):
                module = ROOT.joinpath(*name.split("."))
                todo += [p for p in (module.with_suffix(".py"), module / "__init__.py") if p.is_file()]
                todo += [ROOT / top / "__init__.py"]
            elif top not in sys.stdlib_module_names and top != "__future__":
                third_party.add(top)
    return files, third_party


def dockerfile_pins() -> dict[str, str]:
    return {name: version for name, version in re.findall(r'"([a-z-]+)(?:\[\w+\])?==([\w.]+)"', DOCKERFILE.read_text())}


def test_the_image_pins_the_projects_versions_of_everything_the_locustfile_imports():
    _, third_party = project_closure(LOCUSTFILE)
    assert third_party <= set(DISTRIBUTIONS), f"map these imports to a distribution: {third_party - set(DISTRIBUTIONS)}"
    pins = dockerfile_pins()
    needed = {DISTRIBUTIONS[name] for name in third_party} - LOCUST_DEPENDENCIES
    assert needed <= set(pins), needed - set(pins)
    assert {name: importlib.metadata.version(name) for name in pins} == pins


def test_the_image_copies_every_project_file_the_locustfile_needs():
    files, _ = project_closure(LOCUSTFILE)
    copied = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            copied += [ROOT / source for source in sources]
    for source in copied:
        assert source.exists(), source
    missing = [f for f in files if not any(f == c or (c.is_dir() and c in f.parents) for c in copied)]
    assert not missing, missing
    assert 'ENTRYPOINT ["locust", "-f", "/app/loadtest/locustfile.py"]' in DOCKERFILE.read_text()
