"""`canary --target k8s` gate, rollout, shadow, history and status, end to end: the real CLI,
the real Kubernetes client against the stand-in API server (tests/support/k8s.py), real nginx
playing the Gateway from the routes (tests/support/gateway.py), real Locust, and two V2 slot
processes behind the Gateway's Services.

The slots are `FakeSlot`s (V2 REST and gRPC, answering with their model version): these tests
are about the cluster side of a release (which route rule reaches which Service, what the
gate checks about who answered, what is patched and recorded); how the gate judges real
models is tests/loadtest/test_gate.py's job, on served Bentos.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.canary_cli import assert_one_line_error, run_canary
from tests.support.gate_fixtures import fake_thresholds
from tests.support.gateway import GatewayStandIn
from tests.support.k8s import NS, StubApiServer, write_kubeconfig
from tests.support.upstreams import FakeSlot

IMAGE = "registry.example.com/bento-canary/digits-service"


def set_image(server: StubApiServer, slot: str, version: int | str) -> None:
    path = f"/apis/apps/v1/namespaces/{NS}/deployments/digits-{slot}"
    server.objects[path]["spec"]["template"]["spec"]["containers"][0]["image"] = f"{IMAGE}:v{version}"


class Cluster:
    """The stand-in API server, both slot processes, the Gateway, and the CLI's environment."""

    def __init__(self, server: StubApiServer, slots: dict[str, FakeSlot], folder: Path) -> None:
        self.server, self.slots, self.folder = server, slots, folder
        self.thresholds = fake_thresholds(folder / "thresholds.yaml")
        self.gateway: GatewayStandIn | None = None
        self.env = {
            "CANARY_K8S_KUBECONFIG": str(write_kubeconfig(folder / "kubeconfig", server.url)),
            "CANARY_K8S_REQUEST_TIMEOUT_S": "5",
            "CANARY_ACTOR": "alice",
        }

    def open_gateway(self, services: dict[str, FakeSlot] | None = None) -> GatewayStandIn:
        """The Gateway as the routes are now; `services` maps a slot's Service to the pods it
        selects (default: its own)."""
        services = services or {f"digits-{name}": slot for name, slot in self.slots.items()}
        self.gateway = GatewayStandIn(
            self.folder / "gateway", self.server.get("HTTPRoute", "digits"), self.server.get("GRPCRoute", "digits"),
            {name: (f"127.0.0.1:{s.rest_port}", f"127.0.0.1:{s.grpc_port}") for name, s in services.items()},
        ).__enter__()  # fmt: skip
        self.env |= {"CANARY_K8S_GATEWAY_REST": self.gateway.rest, "CANARY_K8S_GATEWAY_GRPC": self.gateway.grpc}
        return self.gateway

    def canary(self, *args: str, actor: str = "alice"):
        return run_canary("--target", "k8s", *args, env={**self.env, "CANARY_ACTOR": actor})

    def gate_args(self) -> list[str]:
        return ["--duration", "4s", "--users", "24", "--spawn-rate", "24", "--thresholds", str(self.thresholds)]

    def history(self) -> list[dict]:
        result = self.canary("history", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def weights(self) -> dict[str, int]:
        rules = self.server.get("HTTPRoute", "digits")["spec"]["rules"]
        return {ref["name"]: ref["weight"] for ref in rules[2]["backendRefs"]}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Blue stable on v3, green candidate on v4 at 10% (the recorded objects)."""
    with StubApiServer() as server:
        slots = {"blue": FakeSlot("blue", "3", v2=True).start(), "green": FakeSlot("green", "4", v2=True).start()}
        stand = Cluster(server, slots, tmp_path)
        try:
            yield stand
        finally:
            if stand.gateway is not None:
                stand.gateway.__exit__()
            for slot in slots.values():
                slot.stop()


def forced(slot: FakeSlot) -> set[str]:
    """The x-canary values of the inference requests a slot received."""
    return {r["headers"].get("x-canary", "") for r in slot.requests() if "infer" in r["path"].lower()}


def test_the_gate_loads_each_slot_through_its_header_rule_and_records_the_verdict(cluster):
    cluster.open_gateway()
    result = cluster.canary("gate", *cluster.gate_args())
    assert result.returncode == 0, result.stdout + result.stderr
    assert any(line.startswith("gate pass: ") for line in result.stdout.splitlines())
    # who answered: stable's pods got only `never` requests, the candidate's only `always`
    assert forced(cluster.slots["blue"]) == {"never"} and forced(cluster.slots["green"]) == {"always"}
    protocols = {r["protocol"] for r in cluster.slots["green"].requests() if "infer" in r["path"].lower()}
    assert protocols == {"rest", "grpc"}
    (entry,) = [e for e in cluster.history() if e["action"] == "gate"]
    assert (entry["who"], entry["detail"]) == ("alice", "pass at 10% for version 4")
    status = cluster.canary("status")
    assert "last gate: pass at 10% for version 4" in status.stdout


def test_a_service_selecting_the_wrong_pods_fails_the_gate(cluster):
    """A Gateway that sends the candidate's traffic to stable's pods (here: digits-green's
    selector matches blue's pods) must not pass: every answer carries version 3, not 4."""
    cluster.open_gateway({"digits-blue": cluster.slots["blue"], "digits-green": cluster.slots["blue"]})
    result = cluster.canary("gate", *cluster.gate_args())
    assert result.returncode == 1, result.stdout + result.stderr
    assert "gate fail" in result.stdout
    assert forced(cluster.slots["green"]) == set()  # the candidate never answered


def test_the_gate_refuses_slots_it_cannot_tell_apart_and_a_missing_gateway(cluster):
    assert_one_line_error(cluster.canary("gate", *cluster.gate_args()), "set CANARY_K8S_GATEWAY_REST")
    cluster.open_gateway()
    set_image(cluster.server, "green", 3)
    result = cluster.canary("rollout", "--steps", "50,100", "--step-duration", "4s")
    assert_one_line_error(result, "tells the slots apart by model version", "stable runs version 3, candidate 3")
    assert cluster.weights() == {"digits-blue": 90, "digits-green": 10}  # nothing moved


def test_a_rollout_whose_candidate_errors_is_rolled_back_on_the_routes(cluster):
    cluster.open_gateway()
    cluster.slots["green"].behave(status=500)
    result = cluster.canary("rollout", "--steps", "25,100", "--step-duration", "4s", "--thresholds",
                            str(cluster.thresholds))  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "rolled back to 0%: gate fail at 25%" in result.stderr
    assert cluster.weights() == {"digits-blue": 100, "digits-green": 0}
    grpc_rules = cluster.server.get("GRPCRoute", "digits")["spec"]["rules"]
    assert [ref["weight"] for ref in grpc_rules[2]["backendRefs"]] == [100, 0]
    trail = [(e["action"], e["detail"]) for e in cluster.history()]
    assert trail == [
        ("weight", "candidate green 10% -> 25% (stable blue 75%)"),
        ("gate", "fail at 25% for version 4"),
        ("rollback", "candidate green 25% -> 0% (stable blue 100%)"),
    ]
    assert cluster.history()[-1]["reason"].startswith("gate fail at 25%: ")


def test_a_rollout_promotes_and_moves_the_champion_alias(cluster, canary_home, built_pipeline):
    from models.pipeline import train_and_register
    from models.registry import CHAMPION, Registry
    from models.train import TrainConfig

    registry = Registry(canary_home)
    before = registry.client.get_model_version_by_alias(canary_home.registered_model, CHAMPION).version
    candidate = train_and_register(canary_home, TrainConfig(model="digits-linear", epochs=5, seed=1)).ref.version
    for name, version in (("blue", built_pipeline.version), ("green", candidate)):
        set_image(cluster.server, name, version)
        cluster.slots[name].stop()
        cluster.slots[name] = FakeSlot(name, str(version), v2=True).start()
    cluster.open_gateway()
    try:
        result = cluster.canary("rollout", "--steps", "50,100", "--step-duration", "4s", "--thresholds",
                                str(cluster.thresholds))  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        champion = registry.client.get_model_version_by_alias(canary_home.registered_model, CHAMPION).version
        assert int(champion) == candidate
    finally:
        registry.set_alias(CHAMPION, int(before))
    status = json.loads(cluster.canary("status", "--json").stdout)
    assert (status["stable"], status["candidate"], status["weight"], status["grpc_weight"]) == ("green", "blue", 0, 0)
    actions = [e["action"] for e in cluster.history()]
    assert actions == ["weight", "gate", "weight", "gate", "promote"]


def test_shadow_status_and_history_are_kept_in_the_cluster_for_everyone(cluster):
    on = cluster.canary("shadow", "on", actor="alice")
    assert on.returncode == 0, on.stderr
    weighted = cluster.server.get("HTTPRoute", "digits")["spec"]["rules"][2]
    assert weighted["filters"] == [
        {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "digits-green", "port": 3000}}}
    ]
    status = cluster.canary("status")
    assert "unforced REST mirrored to green" in status.stdout.splitlines()[0]
    assert json.loads(cluster.canary("status", "--json").stdout)["shadow"] is True
    assert cluster.canary("weight", "30", actor="bob").returncode == 0
    assert cluster.canary("rollback", "--reason", "p95 up", actor="carol").returncode == 0
    assert "filters" not in cluster.server.get("HTTPRoute", "digits")["spec"]["rules"][2]  # rollback stops it
    # a second engineer with another kubeconfig, same cluster: the same trail
    cluster.env["CANARY_K8S_KUBECONFIG"] = str(
        write_kubeconfig(cluster.folder / "other-kubeconfig", cluster.server.url)
    )
    trail = [(e["who"], e["action"], e["reason"]) for e in cluster.history()]
    assert trail == [("alice", "shadow", ""), ("bob", "weight", ""), ("carol", "rollback", "p95 up")]
    text = cluster.canary("history").stdout.splitlines()
    assert "carol" in text[-1] and "(p95 up)" in text[-1]
    dry = cluster.canary("shadow", "on", "--dry-run")
    assert dry.returncode == 0 and "RequestMirror" in dry.stdout
    assert len(cluster.history()) == 3  # a dry run records nothing


def test_status_watch_redraws_the_clusters_status(cluster, tmp_path, monkeypatch):
    from deploy.k8s_target import K8sSettings
    from deploy.targets.k8s import KubernetesTarget
    from deploy.watch import render
    from models.home import CanaryHome

    settings = K8sSettings(kubeconfig=cluster.env["CANARY_K8S_KUBECONFIG"], request_timeout_s=5)
    target = KubernetesTarget(CanaryHome(), settings=settings)
    frame = render(target, now=lambda: "12:00:00")
    assert frame.splitlines()[0].startswith("canary status --target k8s   12:00:00")
    assert "stable blue, candidate green at 10%" in frame
    cluster.server.errors["GET", f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/httproutes/digits"] = (
        403, "Forbidden", "no",
    )  # fmt: skip
    assert "status unavailable: not allowed to read HTTPRoute" in render(target)
