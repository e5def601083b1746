"""deploy/k8s_target.py: the release commands against recorded API objects (tests/testdata/k8s).

No Kubernetes API runs on these machines, so two stand-ins take its place: `FakeApi` (the
`K8sApi` protocol over the recorded objects, applying what it is sent) for the executor's
behaviour, and `StubApiServer` (a local HTTP server answering the API server's REST paths)
for `KubernetesApi`, so the official client's real requests, headers and error handling
are exercised.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy import k8s_plan
from deploy.k8s_plan import MERGE_PATCH, STRATEGIC_MERGE_PATCH, K8sPatch
from deploy.k8s_target import ConflictError, K8sSettings, K8sTarget, KubernetesApi, format_k8s_status
from deploy.process import free_port
from models.errors import CanaryError, NotFoundError
from tests.support.k8s import NS, FakeApi, StubApiServer, merge_patch, recorded, recorded_objects, write_kubeconfig

V3 = "registry.example.com/bento-canary/digits-service:v3"
V4 = "registry.example.com/bento-canary/digits-service:v4"
V5 = "registry.example.com/bento-canary/digits-service:v5"


@pytest.fixture
def api() -> FakeApi:
    return FakeApi(recorded_objects())


@pytest.fixture
def target(api: FakeApi) -> K8sTarget:
    return K8sTarget(NS, api)


def assert_one_line(error: pytest.ExceptionInfo[CanaryError], *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# -- the executor ------------------------------------------------------------------------


def planned(command: str) -> k8s_plan.K8sPlan:
    """What the planner says each command must send, from the recorded objects."""
    objects = recorded_objects()
    http, grpc = objects["HTTPRoute", "digits"], objects["GRPCRoute", "digits"]
    slots = [objects["Deployment", "digits-blue"], objects["Deployment", "digits-green"]]
    return {
        "weight": lambda: k8s_plan.plan_weight(http, grpc, "blue", "green", 25, slots),
        "rollback": lambda: k8s_plan.plan_rollback(http, grpc),
        "switch": lambda: k8s_plan.plan_switch(http, grpc, slots),
        "promote": lambda: k8s_plan.plan_promote(http, grpc, slots),
    }[command]()


def run(target: K8sTarget, command: str, dry_run: bool) -> k8s_plan.K8sPlan:
    if command == "weight":
        return target.weight(25, dry_run=dry_run)
    if command == "promote":
        return target.promote(dry_run=dry_run).plan
    plan: k8s_plan.K8sPlan = getattr(target, command)(dry_run=dry_run)
    return plan


@pytest.mark.parametrize("command", ["weight", "rollback", "switch", "promote"])
def test_each_command_sends_exactly_the_planned_patches_in_order(target, api, command):
    plan = run(target, command, dry_run=False)
    assert api.patches == list(plan.patches) == list(planned(command).patches)
    assert [(patch.kind, patch.patch_type) for patch in api.patches] == [
        ("HTTPRoute", MERGE_PATCH),
        ("GRPCRoute", MERGE_PATCH),
    ]


@pytest.mark.parametrize("command", ["weight", "rollback", "switch", "promote"])
def test_dry_run_sends_nothing_and_returns_the_plan_it_would_send(target, api, command):
    before = copy.deepcopy(api.objects)
    plan = run(target, command, dry_run=True)
    assert api.patches == [] and api.objects == before
    assert plan == planned(command)
    first_request = plan.describe()[1]
    assert first_request.startswith(f"  PATCH gateway.networking.k8s.io/v1 HTTPRoute {NS}/digits (")


def test_weight_moves_rest_and_grpc_and_status_reads_it_back(target):
    plan = target.weight(25)
    assert plan.summary == "candidate green 10% -> 25% (stable blue 75%)"
    status = target.status()
    assert (status["namespace"], status["stable"], status["candidate"]) == (NS, "blue", "green")
    assert (status["weight"], status["grpc_weight"], status["consistent"]) == (25, 25, True)
    assert target.weight(25).patches == ()  # already there: nothing to send


def test_a_release_runs_rollback_deploy_weight_promote_and_back(target, api):
    target.rollback()
    deploy = target.deploy(5)
    assert deploy.patches == (
        K8sPatch("Deployment", "digits-green", NS, STRATEGIC_MERGE_PATCH,
                 {"spec": {"template": {"spec": {"containers": [{"name": "bento", "image": V5}]}}}}),
    )  # fmt: skip
    status = target.status()
    green = status["slots"]["green"]
    assert (green["image"], green["model_version"], green["rollout_complete"]) == (V5, 5, False)
    # Until the rollout finishes, green's old v4 pods still answer for the slot: no traffic,
    # no promotion. A rollback (weight 0) needs nothing.
    for command in (lambda: target.weight(50), target.promote, target.switch):
        with pytest.raises(CanaryError) as refused:
            command()
        assert_one_line(refused, f"slot green (digits-green) is still rolling out to {V5} (the Deployment "
                                 "controller has not yet picked up its new spec)")  # fmt: skip
    target.weight(0)
    assert [patch.kind for patch in api.patches] == ["HTTPRoute", "GRPCRoute", "Deployment"]
    api.finish_rollout("digits-green")
    assert target.status()["slots"]["green"]["rollout_complete"] is True
    target.weight(50)
    promotion = target.promote()
    assert promotion.model_version == 5
    assert promotion.plan.summary == f"green ({V5}) becomes stable at 100%, blue idle candidate at 0%"
    status = target.status()
    assert (status["stable"], status["candidate"], status["weight"], status["grpc_weight"]) == ("green", "blue", 0, 0)
    assert status["slots"]["blue"]["image"] == V3  # the old stable stays warm for a switch back
    target.switch()
    assert (target.status()["stable"], target.status()["weight"]) == ("blue", 0)
    routes = ["HTTPRoute", "GRPCRoute"]
    assert [patch.kind for patch in api.patches] == [*routes, "Deployment", *routes * 3]


def test_promote_reports_no_version_for_an_image_without_a_version_tag(target, api):
    digest = "registry.example.com/bento-canary/digits-service@sha256:" + "ab" * 32
    api.objects["Deployment", "digits-green"]["spec"]["template"]["spec"]["containers"][0]["image"] = digest
    promotion = target.promote(dry_run=True)
    assert promotion.model_version is None and len(promotion.plan.patches) == 2


def test_deploy_takes_an_image_reference_and_refuses_ambiguous_input(target, api):
    target.rollback()
    digest = "registry.example.com/bento-canary/digits-service@sha256:" + "cd" * 32
    (patch,) = target.deploy(digest).patches
    assert patch.payload()["spec"]["template"]["spec"]["containers"] == [{"name": "bento", "image": digest}]
    sent = len(api.patches)
    with pytest.raises(CanaryError) as error:
        target.deploy("digits-service")
    assert_one_line(error, "a model version (7) or an image with a tag", "'digits-service'")
    with pytest.raises(CanaryError) as error:
        target.deploy(0)
    assert_one_line(error, "model version must be a positive whole number, got 0")
    assert len(api.patches) == sent


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (lambda t: t.deploy(5), "slot green gets 10% of HTTPRoute traffic; deploy to the idle slot or roll back first"),
        (lambda t: t.weight(101), "weight must be a whole number from 0 to 100, got 101"),
        (lambda t: t.weight(-5, dry_run=True), "weight must be a whole number from 0 to 100, got -5"),
    ],
)
def test_planner_refusals_are_one_line_canary_errors_and_send_nothing(target, api, command, message):
    with pytest.raises(CanaryError) as error:
        command(target)
    assert str(error.value) == message
    assert api.patches == []


def test_a_candidate_without_ready_pods_cannot_take_over(target, api):
    api.objects["Deployment", "digits-green"]["status"]["readyReplicas"] = 0
    for command in (target.switch, target.promote):
        with pytest.raises(CanaryError, match=r"^cannot (switch|promote): slot green \(digits-green\) has no ready"):
            command()
    assert api.patches == []


def test_missing_objects_are_one_line_errors_or_shown_as_missing(target, api):
    del api.objects["Deployment", "digits-green"]
    status = target.status()
    assert status["slots"]["green"]["deployment"] is None
    assert "(no Deployment digits-green)" in format_k8s_status(status)
    with pytest.raises(CanaryError, match="^cannot switch: no Deployment for slot green$"):
        target.switch()
    target.rollback()  # needs only the routes; deploy then needs the candidate's Deployment
    with pytest.raises(CanaryError) as error:
        target.deploy(5)
    assert_one_line(error, "cannot deploy to slot green: Deployment bento-canary/digits-green not found")
    del api.objects["GRPCRoute", "digits"]
    with pytest.raises(NotFoundError) as missing:
        target.weight(5)
    assert_one_line(missing, "GRPCRoute bento-canary/digits not found")


def test_a_first_patch_failure_is_passed_on_unchanged(target, api):
    api.fail["HTTPRoute", "digits"] = ConflictError("the HTTPRoute digits changed meanwhile")
    with pytest.raises(ConflictError, match="^the HTTPRoute digits changed meanwhile; run the command again$"):
        target.weight(30)
    assert [patch.kind for patch in api.patches] == ["HTTPRoute"]  # stopped at the failure


@pytest.mark.parametrize(
    ("command", "realign"),
    [
        (lambda t: t.weight(30), "canary --target k8s weight 30"),
        (lambda t: t.rollback(), "canary --target k8s rollback"),
        # the HTTPRoute already holds the new roles: a second switch would flip it back
        (lambda t: t.switch(), "canary --target k8s weight 0"),
        (lambda t: t.promote(), "canary --target k8s weight 0"),
    ],
)
def test_a_failure_half_way_says_what_was_patched_and_how_to_realign(target, api, command, realign):
    api.fail["GRPCRoute", "digits"] = ConflictError("the GRPCRoute digits changed meanwhile")
    with pytest.raises(CanaryError) as error:
        command(target)
    assert_one_line(
        error, "stopped half-way: HTTPRoute digits patched, then GRPCRoute digits failed "
               f"(the GRPCRoute digits changed meanwhile); run `{realign}` to bring it in line",
    )  # fmt: skip
    assert "run the command again" not in str(error.value)
    assert target.status()["consistent"] is False
    api.fail.clear()
    if realign.endswith("rollback"):
        target.rollback()
    else:
        target.weight(int(realign.rsplit(" ", 1)[1]))
    assert target.status()["consistent"] is True


# -- status text --------------------------------------------------------------------------


def test_status_text_shows_roles_weights_versions_and_rollouts(target, api):
    assert format_k8s_status(target.status()).splitlines() == [
        "namespace bento-canary: stable blue, candidate green at 10% (gRPC 10%)",
        "slot   role        REST  gRPC  version  ready  rollout     image",
        f"blue   stable       90%   90%        3    3/3  complete    {V3}",
        f"green  candidate    10%   10%        4    3/3  complete    {V4}",
    ]
    for ref in api.objects["GRPCRoute", "digits"]["spec"]["rules"][2]["backendRefs"]:
        ref["weight"] = 1  # someone split gRPC 50/50 by hand
    api.objects["Deployment", "digits-green"]["status"]["readyReplicas"] = 1
    api.objects["Deployment", "digits-green"]["status"]["updatedReplicas"] = 1
    lines = format_k8s_status(target.status()).splitlines()
    assert lines[0] == "namespace bento-canary: stable blue, candidate green at 10% (gRPC 50%)"
    assert lines[3] == f"green  candidate    10%   50%        4    1/3  in progress {V4}"
    assert lines[4] == "warning: the HTTPRoute and GRPCRoute disagree; `canary --target k8s weight <N>` realigns them"


# -- the real client against a stand-in API server ----------------------------------------


@pytest.fixture
def server() -> Iterator[StubApiServer]:
    with StubApiServer() as stub:
        yield stub


@pytest.fixture
def real_target(server: StubApiServer, tmp_path: Path) -> K8sTarget:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server.url)
    return K8sTarget(NS, KubernetesApi(K8sSettings(kubeconfig=str(kubeconfig), request_timeout_s=5)))


def test_the_real_client_reads_the_objects_and_sends_the_exact_patches(real_target, server):
    plan = real_target.weight(25)
    reads = [(r.method, r.path) for r in server.requests if r.method == "GET"]
    assert reads[:2] == [
        ("GET", f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/httproutes/digits"),
        ("GET", f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/grpcroutes/digits"),
    ]
    patches = [r for r in server.requests if r.method == "PATCH"]
    assert [(r.path, r.content_type, r.query, r.body) for r in patches] == [
        (f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/{plural}/digits", MERGE_PATCH,
         {"fieldManager": ["bento-canary"]}, patch.payload())
        for plural, patch in zip(("httproutes", "grpcroutes"), plan.patches, strict=True)
    ]  # fmt: skip
    assert {r.authorization for r in server.requests} == {"Bearer stub-token"}
    assert real_target.status()["slots"]["green"]["image"] == V4


def test_the_real_client_sets_an_image_with_a_strategic_merge_patch(real_target, server):
    for plural, kind in (("httproutes", "HTTPRoute"), ("grpcroutes", "GRPCRoute")):
        server.objects[f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/{plural}/digits"] = rolled_back(kind)
    real_target.deploy(5)
    (patch,) = [r for r in server.requests if r.method == "PATCH"]
    assert (patch.path, patch.content_type) == (f"/apis/apps/v1/namespaces/{NS}/deployments/digits-green",
                                                STRATEGIC_MERGE_PATCH)  # fmt: skip
    assert patch.body == {"spec": {"template": {"spec": {"containers": [{"name": "bento", "image": V5}]}}}}


def test_the_content_type_is_the_plans_not_the_clients_guess(real_target, server):
    body = {"spec": {"template": {"spec": {"containers": [{"name": "bento", "image": V5}]}}}}
    real_target.api.patch(K8sPatch("Deployment", "digits-green", NS, MERGE_PATCH, body))
    (patch,) = server.requests
    assert (patch.method, patch.content_type, patch.body) == ("PATCH", MERGE_PATCH, body)


def rolled_back(kind: str) -> dict[str, Any]:
    """The recorded route after `rollback` (candidate at 0%), as the API server stores it."""
    http, grpc = recorded("httproute"), recorded("grpcroute")
    route = http if kind == "HTTPRoute" else grpc
    (patch,) = [p for p in k8s_plan.plan_rollback(http, grpc).patches if p.kind == kind]
    after: dict[str, Any] = merge_patch(route, patch.payload())
    return after


ROUTE_PATH = f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/httproutes/digits"


CONFLICT = (
    'Operation cannot be fulfilled on httproutes.gateway.networking.k8s.io "digits": the object has been modified; '
    "please apply your changes to the latest version and try again"
)
FORBIDDEN = (
    'httproutes.gateway.networking.k8s.io "digits" is forbidden: User "dev" cannot get resource "httproutes"\n'
    'in API group "gateway.networking.k8s.io"'
)
INVALID = (
    'HTTPRoute.gateway.networking.k8s.io "digits" is invalid: spec.rules[2].backendRefs[0].weight: Invalid value: -1'
)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (("PATCH", 409, "Conflict", CONFLICT), "the HTTPRoute digits changed meanwhile; run the command again"),
        (
            ("GET", 404, "NotFound", 'httproutes.gateway.networking.k8s.io "digits" not found'),
            (
                'HTTPRoute bento-canary/digits not found (httproutes.gateway.networking.k8s.io "digits" not found); '
                "apply an overlay of deploy/k8s first or set CANARY_K8S_NAMESPACE"
            ),
        ),
        (
            ("GET", 403, "Forbidden", FORBIDDEN),
            "not allowed to read HTTPRoute bento-canary/digits: " + " ".join(FORBIDDEN.split()),
        ),
        (
            ("PATCH", 422, "Invalid", INVALID),
            "the API server refused to patch HTTPRoute bento-canary/digits: " + INVALID,
        ),
        (
            ("PATCH", 500, "InternalError", "etcdserver: request timed out"),
            "could not patch HTTPRoute bento-canary/digits: HTTP 500 etcdserver: request timed out",
        ),
    ],
)
def test_api_errors_become_one_line_canary_errors(real_target, server, error, expected):
    method, code, reason, message = error
    server.errors[method, ROUTE_PATH] = (code, reason, message)
    with pytest.raises(CanaryError) as caught:
        real_target.weight(30)
    assert str(caught.value) == expected
    assert len([r for r in server.requests if r.method == "PATCH"]) <= 1  # nothing after a failure


def test_an_answer_that_is_no_kubernetes_object_is_one_line(real_target, server):
    server.html = True
    with pytest.raises(CanaryError) as error:
        real_target.status()
    assert (
        str(error.value) == f"{server.url} answered with something other than a Kubernetes object (a proxy in the way?)"
    )


def test_an_unreachable_api_server_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    port = free_port()  # nothing listens there
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")
    target = K8sTarget(NS, KubernetesApi(K8sSettings(kubeconfig=str(kubeconfig), request_timeout_s=2)))
    with pytest.raises(CanaryError) as error:
        target.status()
    assert_one_line(error, f"cannot reach http://127.0.0.1:{port} to read HTTPRoute bento-canary/digits", "refused")


@pytest.mark.parametrize("content", ["", "not: [valid"])
def test_without_a_kubeconfig_the_real_api_fails_with_one_line(tmp_path, monkeypatch, content):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(content)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("CANARY_K8S_KUBECONFIG", raising=False)
    api = KubernetesApi()  # reads nothing yet: the CLI can build it before knowing the command
    with pytest.raises(CanaryError) as error:
        K8sTarget(NS, api).status()
    assert_one_line(error, "no Kubernetes credentials: ", "point KUBECONFIG at a kubeconfig")
