"""`canary --target k8s`: read the cluster, plan with `deploy.k8s_plan`, send the patches.

`K8sTarget` is the executor of the pure planner. Every command reads the `digits` HTTPRoute
and GRPCRoute and the slot Deployments, asks the planner for a `K8sPlan`, and unless it is a
dry run sends the plan's patches in order through a `K8sApi`. The plan is returned either
way: `plan.describe()` is what `--dry-run` prints.

`KubernetesApi` is the `K8sApi` of a real cluster (the official `kubernetes` client). It
loads the kubeconfig, or the in-cluster service account, at its first request, and turns
every failure into a one-line `CanaryError`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from deploy import k8s_plan
from deploy.k8s_history import ClusterHistory
from deploy.k8s_plan import SLOTS, K8sPatch, K8sPlan
from models.errors import CanaryError, ConflictError, NotFoundError

# The planner's object names (deploy/k8s/base and components/gateway-api): both routes are
# `digits`; a slot's Deployment shares its Service's name, digits-blue / digits-green.
ROUTE = "digits"
DEPLOYMENT_PREFIX = k8s_plan.SERVICE_PREFIX
ROUTE_KINDS = ("HTTPRoute", "GRPCRoute")


class K8sSettings(BaseSettings):
    """Where `canary --target k8s` works (env prefix CANARY_K8S_)."""

    model_config = SettingsConfigDict(env_prefix="CANARY_K8S_", extra="ignore", frozen=True)

    namespace: str = Field(default="bento-canary", description="Namespace of the routes and slot Deployments.")
    context: str | None = Field(default=None, description="kubeconfig context; default: the current context.")
    kubeconfig: str | None = Field(default=None, description="kubeconfig file; default: $KUBECONFIG, ~/.kube/config.")
    request_timeout_s: float = Field(default=15.0, gt=0, description="Timeout of one API request.")
    field_manager: str = Field(default="bento-canary", description="Field manager named on every patch.")
    history_configmap: str = Field(default="bento-canary-history", description="ConfigMap keeping the audit trail.")
    history_max_entries: int = Field(default=500, ge=10, le=5000, description="Oldest entries dropped past this.")
    # Where the gate reaches the slots: the Gateway's listeners, with the routes' x-canary rules.
    gateway_rest: str | None = Field(default=None, description="The Gateway's REST base URL, e.g. http://10.0.0.7.")
    gateway_grpc: str | None = Field(default=None, description="The Gateway's gRPC listener, host:port.")


class K8sApi(Protocol):
    """The two requests the executor needs; objects are plain dicts as the API returns them."""

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        """The object, or `NotFoundError` when it does not exist; other failures: `CanaryError`."""

    def patch(self, patch: K8sPatch) -> dict[str, Any]:
        """Send one planned patch unchanged; returns the patched object. Failures: `CanaryError`."""

    def create(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create an object (the history ConfigMap); `ConflictError` when it already exists."""


class Promotion(NamedTuple):
    """`promote`'s plan and the model version the new stable serves (None: no `:v<N>` tag)."""

    plan: K8sPlan
    model_version: int | None


class K8sTarget:
    """The release commands against one namespace of a cluster. Every change that was sent
    is appended to the cluster's history (deploy/k8s_history.py); a history that cannot be
    written does not undo the change: it lands in `warnings` for the caller to print."""

    def __init__(self, namespace: str, api: K8sApi, history: ClusterHistory | None = None) -> None:
        self.namespace = namespace
        self.api = api
        self.history = history or ClusterHistory(api, namespace, K8sSettings.model_fields["history_configmap"].default)
        self.warnings: list[str] = []

    def record(self, action: str, detail: str, reason: str = "", **extra: Any) -> None:
        try:
            self.history.append(action, detail, reason, **extra)
        except CanaryError as exc:
            self.warnings.append(f"warning: not recorded in the cluster's history: {exc}")

    # -- reading --------------------------------------------------------------------------
    def _routes(self) -> tuple[dict[str, Any], dict[str, Any]]:
        http, grpc = (self.api.get(kind, self.namespace, ROUTE) for kind in ROUTE_KINDS)
        return http, grpc

    def _deployment(self, slot: str) -> dict[str, Any]:
        return self.api.get("Deployment", self.namespace, DEPLOYMENT_PREFIX + slot)

    def _deployments(self) -> list[dict[str, Any]]:
        """The slot Deployments that exist; the planner says what a missing one means."""
        found = []
        for slot in SLOTS:
            try:
                found.append(self._deployment(slot))
            except NotFoundError:
                continue
        return found

    def _roles(self, http: dict[str, Any], grpc: dict[str, Any]) -> tuple[str, str, int]:
        now = _planned(k8s_plan.read_status, [], http, grpc)
        return now["stable"], now["candidate"], now["weight"]

    # -- applying -------------------------------------------------------------------------
    def _apply(self, plan: K8sPlan, dry_run: bool, realign: str, reason: str = "") -> K8sPlan:
        """Send the patches in order, then record them in the history. A failure after the
        first patch leaves the routes disagreeing; `realign` is the command that brings the
        rest in line."""
        if dry_run or not plan.patches:
            return plan
        for index, patch in enumerate(plan.patches):
            try:
                self.api.patch(patch)
            except CanaryError as exc:
                if index == 0:
                    raise
                done = ", ".join(f"{p.kind} {p.name}" for p in plan.patches[:index])
                reason = exc.what if isinstance(exc, ConflictError) else str(exc)
                raise CanaryError(
                    f"{plan.action} stopped half-way: {done} patched, then {patch.kind} {patch.name} failed "
                    f"({reason}); run `{realign}` to bring it in line"
                ) from exc
        self.record(plan.action, plan.summary, reason)
        return plan

    # -- the commands ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Roles, weights, images, model versions and rollout state (`canary status --json`)."""
        http, grpc = self._routes()
        status = _planned(k8s_plan.read_status, self._deployments(), http, grpc)
        return {"namespace": self.namespace, **status}

    def weight(self, percent: int, dry_run: bool = False, reason: str = "") -> K8sPlan:
        """The candidate's share of unforced REST and gRPC traffic; roles stay."""
        http, grpc = self._routes()
        stable, candidate, _ = self._roles(http, grpc)
        # a rollback (0) needs no Deployment: it must work even when they cannot be read
        slots = self._deployments() if percent > 0 else []
        plan = _planned(k8s_plan.plan_weight, http, grpc, stable, candidate, percent, slots)
        return self._apply(plan, dry_run, f"canary --target k8s weight {percent}", reason)

    def rollback(self, dry_run: bool = False, reason: str = "") -> K8sPlan:
        """The candidate gets 0% at once and keeps running."""
        http, grpc = self._routes()
        plan = _planned(k8s_plan.plan_rollback, http, grpc)
        return self._apply(plan, dry_run, "canary --target k8s rollback", reason)

    def shadow(self, on: bool, dry_run: bool = False) -> K8sPlan:
        """Mirror unforced REST traffic to the candidate (RequestMirror on the HTTPRoute)."""
        http, grpc = self._routes()
        plan = _planned(k8s_plan.plan_shadow, http, grpc, on, self._deployments() if on else [])
        return self._apply(plan, dry_run, f"canary --target k8s shadow {'on' if on else 'off'}")

    def switch(self, dry_run: bool = False) -> K8sPlan:
        """Blue-green cut-over; the old stable stays warm as the idle candidate."""
        http, grpc = self._routes()
        plan = _planned(k8s_plan.plan_switch, http, grpc, self._deployments())
        # After a half-done role change the HTTPRoute holds the new roles; weight 0 realigns
        # the GRPCRoute to them (a second switch would flip the HTTPRoute back instead).
        return self._apply(plan, dry_run, "canary --target k8s weight 0")

    def promote(self, dry_run: bool = False) -> Promotion:
        """The candidate becomes stable at 100%. Moving the MLflow alias is the caller's step,
        after this returns, with `model_version`."""
        http, grpc = self._routes()
        deployments = self._deployments()
        plan = _planned(k8s_plan.plan_promote, http, grpc, deployments)
        now = _planned(k8s_plan.read_status, deployments, http, grpc)
        version = now["slots"][now["candidate"]].get("model_version")
        return Promotion(self._apply(plan, dry_run, "canary --target k8s weight 0"), version)

    def deploy(self, release: int | str, dry_run: bool = False) -> K8sPlan:
        """Put a model version (`7`: the slot's own image repository, tag `v7`) or an image
        reference with a tag or digest into the candidate slot. The slot must get no traffic:
        roll back first, as with the local stack."""
        http, grpc = self._routes()
        _, candidate, _ = self._roles(http, grpc)
        try:
            deployment = self._deployment(candidate)
        except NotFoundError as exc:
            raise CanaryError(f"cannot deploy to slot {candidate}: {exc}") from None
        text = str(release)
        if isinstance(release, int) or text.isdigit():
            image = _planned(k8s_plan.image_for_version, deployment, int(release))
        elif ":" in text or "@" in text:
            image = text
        else:  # a bare name would silently mean :latest
            raise CanaryError(
                f"deploy takes a model version (7) or an image with a tag (repo/digits-service:v7), got {text!r}"
            )
        plan = _planned(k8s_plan.plan_deploy, deployment, image, routes=[http, grpc])
        return self._apply(plan, dry_run, f"canary --target k8s deploy {text}")


def _planned(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a planner function; its one-line `ValueError`s are the user's errors."""
    try:
        return function(*args, **kwargs)
    except ValueError as exc:
        raise CanaryError(str(exc)) from None


def k8s_target(settings: K8sSettings | None = None) -> K8sTarget:
    """The target the CLI uses: settings from CANARY_K8S_*, the real API, nothing contacted yet."""
    settings = settings or K8sSettings()
    api = KubernetesApi(settings)
    history = ClusterHistory(api, settings.namespace, settings.history_configmap, settings.history_max_entries)
    return K8sTarget(settings.namespace, api, history)


# -- status text ---------------------------------------------------------------------------


def format_k8s_status(status: dict[str, Any]) -> str:
    """`canary --target k8s status`: one line for the routes, one per slot."""
    head = (
        f"namespace {status['namespace']}: stable {status['stable']}, candidate {status['candidate']} "
        f"at {status['weight']}% (gRPC {status['grpc_weight']}%)"
    )
    if status.get("shadow"):
        head += f", unforced REST mirrored to {status['candidate']}"
    lines = [head]
    lines.append(
        f"{'slot':<6} {'role':<10} {'REST':>5} {'gRPC':>5}  {'version':>7}  {'ready':>5}  {'rollout':<11} image"
    )
    for name, slot in status["slots"].items():
        if slot["deployment"] is None:
            version, ready, rollout, image = "-", "-", "-", f"(no Deployment {DEPLOYMENT_PREFIX}{name})"
        else:
            version = str(slot["model_version"] or "-")
            ready = f"{slot['ready_replicas']}/{slot['replicas']}"
            rollout = "complete" if slot["rollout_complete"] else "in progress"
            image = slot["image"]
        lines.append(
            f"{name:<6} {slot['role']:<10} {slot['weight']:>4}% {slot['grpc_weight']:>4}%  {version:>7}  {ready:>5}  "
            f"{rollout:<11} {image}"
        )
    if not status["consistent"]:
        lines.append("warning: the HTTPRoute and GRPCRoute disagree; `canary --target k8s weight <N>` realigns them")
    return "\n".join(lines)


# -- the real API ----------------------------------------------------------------------------

# kind -> (API group, version, plural); Deployments go through AppsV1Api, routes through
# CustomObjectsApi (Gateway API CRDs).
_RESOURCES = {
    "ConfigMap": ("", "v1", "configmaps"),
    "Deployment": ("apps", "v1", "deployments"),
    "HTTPRoute": ("gateway.networking.k8s.io", "v1", "httproutes"),
    "GRPCRoute": ("gateway.networking.k8s.io", "v1", "grpcroutes"),
}


class KubernetesApi:
    """`K8sApi` through the official client. Responses are read raw (`_preload_content=False`)
    so callers get the API server's JSON, the shape the planner and tests/testdata/k8s use."""

    def __init__(self, settings: K8sSettings | None = None) -> None:
        self.settings = settings or K8sSettings()
        self._client: Any = None
        self._server = "the Kubernetes API"

    def _api_client(self) -> Any:
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _connect(self) -> Any:
        import yaml
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            # kubectl's order: the kubeconfig first, the pod's service account as fallback.
            config.load_kube_config(
                config_file=self.settings.kubeconfig, context=self.settings.context,
                client_configuration=configuration,
            )  # fmt: skip
        except (config.ConfigException, OSError, ValueError, yaml.YAMLError) as exc:
            if not os.environ.get("KUBERNETES_SERVICE_HOST"):
                raise CanaryError(
                    f"no Kubernetes credentials: {_one_line(exc)} (point KUBECONFIG at a kubeconfig, "
                    "or run canary in a pod of the cluster)"
                ) from None
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException as in_cluster:
                raise CanaryError(f"no Kubernetes credentials: {_one_line(in_cluster)}") from None
        # Connection errors are retried; urllib3 never replays a PATCH once its request went out.
        configuration.retries = 2
        self._server = configuration.host
        return client.ApiClient(configuration)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        from kubernetes import client

        group, version, plural = _resource(kind)
        options: dict[str, Any] = {"_preload_content": False, "_request_timeout": self.settings.request_timeout_s}
        response: Any
        with self._errors("read", kind, namespace, name):
            if kind == "Deployment":
                response = client.AppsV1Api(self._api_client()).read_namespaced_deployment(name, namespace, **options)
            elif kind == "ConfigMap":
                response = client.CoreV1Api(self._api_client()).read_namespaced_config_map(name, namespace, **options)
            else:
                response = client.CustomObjectsApi(self._api_client()).get_namespaced_custom_object(
                    group, version, namespace, plural, name, **options
                )
            return _json(response, self._server)

    def patch(self, patch: K8sPatch) -> dict[str, Any]:
        from kubernetes import client

        group, version, plural = _resource(patch.kind)
        response: Any
        options: dict[str, Any] = {
            "field_manager": self.settings.field_manager,
            "_content_type": patch.patch_type,  # the client would otherwise pick one itself
            "_preload_content": False,
            "_request_timeout": self.settings.request_timeout_s,
        }
        with self._errors("patch", patch.kind, patch.namespace, patch.name):
            if patch.kind == "Deployment":
                response = client.AppsV1Api(self._api_client()).patch_namespaced_deployment(
                    patch.name, patch.namespace, patch.payload(), **options
                )
            elif patch.kind == "ConfigMap":
                response = client.CoreV1Api(self._api_client()).patch_namespaced_config_map(
                    patch.name, patch.namespace, patch.payload(), **options
                )
            else:
                response = client.CustomObjectsApi(self._api_client()).patch_namespaced_custom_object(
                    group, version, patch.namespace, plural, patch.name, patch.payload(), **options
                )
            return _json(response, self._server)

    def create(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        from kubernetes import client

        if kind != "ConfigMap":
            raise CanaryError(f"canary creates no {kind} objects")
        name = str((body.get("metadata") or {}).get("name", ""))
        options: dict[str, Any] = {
            "field_manager": self.settings.field_manager,
            "_preload_content": False,
            "_request_timeout": self.settings.request_timeout_s,
        }
        with self._errors("create", kind, namespace, name):
            api = client.CoreV1Api(self._api_client())
            response = api.create_namespaced_config_map(namespace, body, **options)  # type: ignore[arg-type]  # a dict is sent as is
            return _json(response, self._server)

    @contextlib.contextmanager
    def _errors(self, verb: str, kind: str, namespace: str, name: str) -> Iterator[None]:
        """The client's exceptions for one request, as one-line `CanaryError`s."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        try:
            yield
        except ApiException as exc:
            raise _from_status(exc, verb, kind, namespace, name) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise CanaryError(
                f"cannot reach {self._server} to {verb} {kind} {namespace}/{name}: {_one_line(reason)}"
            ) from None


def _from_status(exc: Any, verb: str, kind: str, namespace: str, name: str) -> CanaryError:
    """An API error response (a `Status` object) -> what the user can do about it."""
    status = int(exc.status or 0)
    try:
        message = json.loads(exc.body or "{}").get("message") or exc.reason
    except (ValueError, AttributeError):
        message = exc.reason
    message = _one_line(message or f"HTTP {status}")
    target = f"{kind} {namespace}/{name}"
    if status == 404:
        return NotFoundError(
            f"{target} not found ({message}); apply an overlay of deploy/k8s first or set CANARY_K8S_NAMESPACE"
        )
    if status == 409:
        # The route patches carry the resourceVersion they were planned from; a create of an
        # object that exists is a 409 too.
        what = "exists already" if verb == "create" else "changed meanwhile"
        return ConflictError(f"the {kind} {name} {what}")
    if status in (401, 403):
        return CanaryError(f"not allowed to {verb} {target}: {message}")
    if status in (400, 422):
        return CanaryError(f"the API server refused to {verb} {target}: {message}")
    return CanaryError(f"could not {verb} {target}: HTTP {status} {message}")


def _resource(kind: str) -> tuple[str, str, str]:
    if kind not in _RESOURCES:
        raise CanaryError(f"canary does not handle {kind} objects")
    return _RESOURCES[kind]


def _json(response: Any, server: str) -> dict[str, Any]:
    try:
        body = json.loads(response.data)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise CanaryError(f"{server} answered with something other than a Kubernetes object (a proxy in the way?)")
    return body


def _one_line(value: object, limit: int = 240) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
