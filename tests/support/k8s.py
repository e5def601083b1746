"""Stand-ins for the Kubernetes API, shared by the Kubernetes tests.

No Kubernetes API runs on these machines, so two stand-ins take its place: `FakeApi` (the
`K8sApi` protocol over the recorded objects of tests/testdata/k8s, applying what it is sent)
for the executor's behaviour, and `StubApiServer` (a local HTTP server answering the API
server's REST paths, applying patches and creates as the API server does, `resourceVersion`
conflicts included) for `KubernetesApi`, so the official client's real requests, headers
and error handling are exercised.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import yaml

from deploy.k8s_plan import MERGE_PATCH, STRATEGIC_MERGE_PATCH, K8sPatch
from models.errors import CanaryError, NotFoundError

RECORDED = Path(__file__).resolve().parents[1] / "testdata" / "k8s"
NS = "bento-canary"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies application/merge-patch+json."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def recorded(name: str) -> dict[str, Any]:
    return json.loads((RECORDED / f"{name}.json").read_text())


def recorded_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Mid-canary: blue stable on v3, green candidate on v4 at 10%."""
    return {
        ("HTTPRoute", "digits"): recorded("httproute"),
        ("GRPCRoute", "digits"): recorded("grpcroute"),
        ("Deployment", "digits-blue"): recorded("deployment-blue"),
        ("Deployment", "digits-green"): recorded("deployment-green"),
    }


def apply_patch(current: dict[str, Any], patch_type: str, payload: dict[str, Any]) -> dict[str, Any]:
    """What the API server stores after a patch: a merge patch as RFC 7386; the planner's one
    strategic merge patch (a container's image, by name) with the list merged by name."""
    if patch_type == MERGE_PATCH:
        updated: dict[str, Any] = merge_patch(current, payload)
    else:
        assert patch_type == STRATEGIC_MERGE_PATCH, patch_type
        updated = copy.deepcopy(current)
        (change,) = payload["spec"]["template"]["spec"]["containers"]
        for container in updated["spec"]["template"]["spec"]["containers"]:
            if container["name"] == change["name"]:
                container["image"] = change["image"]
        updated["metadata"]["generation"] = int(updated["metadata"].get("generation", 1)) + 1
    updated["metadata"]["resourceVersion"] = str(int(current["metadata"].get("resourceVersion", "1")) + 100)
    return updated


def stale(current: dict[str, Any], payload: dict[str, Any]) -> bool:
    """A patch that names a resourceVersion the object no longer has: the API server's 409."""
    sent = (payload.get("metadata") or {}).get("resourceVersion")
    return sent is not None and sent != current["metadata"].get("resourceVersion")


class FakeApi:
    """`K8sApi` over recorded objects: records every route and Deployment patch in `patches`
    and applies it, so a sequence of commands sees its own changes; the history ConfigMap's
    writes are applied too, and not listed in `patches`. `fail[(kind, name)]` makes that
    object's patch raise."""

    def __init__(self, objects: dict[tuple[str, str], dict[str, Any]]) -> None:
        self.objects = objects
        self.patches: list[K8sPatch] = []
        self.fail: dict[tuple[str, str], CanaryError] = {}

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        assert namespace == NS
        if (kind, name) not in self.objects:
            raise NotFoundError(f"{kind} {namespace}/{name} not found")
        return copy.deepcopy(self.objects[kind, name])

    def patch(self, patch: K8sPatch) -> dict[str, Any]:
        from models.errors import ConflictError

        if patch.kind != "ConfigMap":
            self.patches.append(patch)
        key = (patch.kind, patch.name)
        if key in self.fail:
            raise self.fail[key]
        current = self.objects[key]
        if patch.kind != "ConfigMap" and patch.patch_type == MERGE_PATCH:
            assert patch.payload()["metadata"]["resourceVersion"] == current["metadata"]["resourceVersion"]
        if stale(current, patch.payload()):
            raise ConflictError(f"the {patch.kind} {patch.name} changed meanwhile")
        self.objects[key] = apply_patch(current, patch.patch_type, patch.payload())
        return copy.deepcopy(self.objects[key])

    def finish_rollout(self, name: str) -> None:
        """What the Deployment controller reports once every pod of `name` runs its spec."""
        deployment = self.objects["Deployment", name]
        desired = deployment["spec"]["replicas"]
        deployment["status"].update(observedGeneration=deployment["metadata"]["generation"], replicas=desired,
                                    updatedReplicas=desired, readyReplicas=desired, availableReplicas=desired)  # fmt: skip

    def create(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        from models.errors import ConflictError

        key = (kind, body["metadata"]["name"])
        if key in self.objects:
            raise ConflictError(f"the {kind} {key[1]} exists already")
        self.objects[key] = {**copy.deepcopy(body), "metadata": {**body["metadata"], "resourceVersion": "1"}}
        return copy.deepcopy(self.objects[key])


# -- the real client against a stand-in API server ----------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None
    authorization: str | None
    body: Any


def object_path(kind: str, name: str, namespace: str = NS) -> str:
    """The API server's REST path of one object."""
    return {
        "Deployment": f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
        "HTTPRoute": f"/apis/gateway.networking.k8s.io/v1/namespaces/{namespace}/httproutes/{name}",
        "GRPCRoute": f"/apis/gateway.networking.k8s.io/v1/namespaces/{namespace}/grpcroutes/{name}",
        "ConfigMap": f"/api/v1/namespaces/{namespace}/configmaps/{name}",
    }[kind]


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": code}  # fmt: skip


class StubApiServer:
    """The API server's REST paths for the recorded objects: GET returns the object, PATCH
    applies the patch (409 for a stale `resourceVersion`) and returns the result, POST to a
    collection creates (409 when it exists), `errors[(method, path)]` answers with an error
    `Status`. Every request is recorded; `objects` maps paths to the stored objects."""

    def __init__(self) -> None:
        self.objects = {object_path(kind, name): obj for (kind, name), obj in recorded_objects().items()}
        self.requests: list[Request] = []
        self.errors: dict[tuple[str, str], tuple[int, str, str]] = {}
        self.html = False  # answer everything with a web page, as a wrong URL or a login proxy does
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                request = Request(
                    self.command, url.path, parse_qs(url.query), self.headers.get("Content-Type"),
                    self.headers.get("Authorization"), body,
                )  # fmt: skip
                with stub.lock:
                    stub.requests.append(request)
                    code, answer = stub._handle(request)
                data, content_type = json.dumps(answer).encode(), "application/json"
                if stub.html:
                    data, content_type = b"<html><body>Sign in</body></html>", "text/html"
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def _handle(self, request: Request) -> tuple[int, dict[str, Any]]:
        if (request.method, request.path) in self.errors:
            code, reason, message = self.errors[request.method, request.path]
            return code, _status(code, reason, message)
        if request.method == "POST":
            name = (request.body.get("metadata") or {}).get("name", "")
            path = f"{request.path}/{name}"
            if path in self.objects:
                return 409, _status(409, "AlreadyExists", f'configmaps "{name}" already exists')
            created = copy.deepcopy(request.body)
            created["metadata"]["resourceVersion"] = "1"
            self.objects[path] = created
            return 201, created
        if request.path not in self.objects:
            return 404, _status(404, "NotFound", "the server could not find the requested resource")
        current = self.objects[request.path]
        if request.method == "PATCH":
            if stale(current, request.body):
                return 409, _status(409, "Conflict", "the object has been modified; please apply your changes "
                                                    "to the latest version and try again")  # fmt: skip
            self.objects[request.path] = apply_patch(current, request.content_type or "", request.body)
        return 200, self.objects[request.path]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        with self.lock:
            return copy.deepcopy(self.objects[object_path(kind, name)])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "stub",
        "clusters": [{"name": "stub", "cluster": {"server": server}}],
        "users": [{"name": "stub", "user": {"token": "stub-token"}}],
        "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "stub"}}],
    }))  # fmt: skip
    return path


def stub_api_server() -> Iterator[StubApiServer]:
    with StubApiServer() as stub:
        yield stub
