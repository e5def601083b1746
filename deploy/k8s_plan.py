"""Pure planning for `canary --target k8s`: recorded API objects in, immutable patches out.

The functions read the objects as the Kubernetes API returns them (plain dicts: the
`digits` HTTPRoute and GRPCRoute of deploy/k8s/components/gateway-api, the slot Deployments
of deploy/k8s/base) and return a `K8sPlan` whose `K8sPatch`es an executor sends unchanged
(`--dry-run` prints `plan.describe()`). Nothing here talks to a cluster.

The routes are the single source of truth for traffic. Each has three rules whose
backendRefs this module owns: `x-canary: always` -> the candidate slot's Service,
`x-canary: never` -> the stable slot's Service, and the rule without an x-canary match, which
splits everyone else by weight. Route patches are JSON merge patches (custom resources take
no strategic merge), so they carry the whole `spec.rules` list; every other field of every
rule is copied from the recorded object, and `metadata.resourceVersion` makes the API server
refuse the patch (409) if the route changed since it was read. Deployment patches are
strategic merge patches that set one container's image by name.

Shadow traffic is a Gateway API `RequestMirror` filter on the HTTPRoute's weighted rule that
names the candidate's Service: the gateway sends a copy of each unforced REST request there
and discards the answer. As on the local stack, a rollback or a role change (switch,
promote) turns it off; a weight change keeps it. The GRPCRoute is never mirrored (gRPC
mirroring is an extended feature few gateways implement).

Bad input raises `ValueError` with a one-line message.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from deploy.state import SLOTS

SERVICE_PREFIX = "digits-"  # slot Services are digits-blue and digits-green
SLOT_LABEL = "bento-canary/slot"
CONTAINER = "bento"
CANARY_HEADER = "x-canary"
MIRROR = "RequestMirror"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
API_VERSIONS = {
    "Deployment": "apps/v1",
    "HTTPRoute": "gateway.networking.k8s.io/v1",
    "GRPCRoute": "gateway.networking.k8s.io/v1",
    "ConfigMap": "v1",
}
# An OCI image reference: [registry[:port]/]path[:tag][@sha256:digest].
_COMPONENT = r"[a-z0-9]+(?:[._-]+[a-z0-9]+)*"
_IMAGE = re.compile(
    rf"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::\w[\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$"
)
_VERSION_TAG = re.compile(r":v(\d+)$")

Obj = Mapping[str, Any]


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(item) for item in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_thaw(item) for item in value]
    return value


@dataclass(frozen=True)
class K8sPatch:
    """One PATCH request: `body` (read-only) goes to the object with Content-Type `patch_type`."""

    kind: str
    name: str
    namespace: str
    patch_type: str
    body: Mapping[str, Any]

    def __post_init__(self) -> None:
        object.__setattr__(self, "body", _freeze(self.body))

    @property
    def api_version(self) -> str:
        return API_VERSIONS[self.kind]

    def payload(self) -> dict[str, Any]:
        """The body as fresh plain dicts and lists, for a client's `body=`."""
        body: dict[str, Any] = _thaw(self.body)
        return body

    def json(self) -> str:
        return json.dumps(self.payload(), separators=(",", ":"))


@dataclass(frozen=True)
class K8sPlan:
    """What one command will change. No patches means the cluster is already there."""

    action: str
    summary: str
    patches: tuple[K8sPatch, ...]

    def describe(self) -> list[str]:
        """The `--dry-run` lines: the summary, then each request and its exact body."""
        lines = [f"{self.action}: {self.summary}"]
        if not self.patches:
            lines.append("  nothing to patch")
        for patch in self.patches:
            target = f"{patch.api_version} {patch.kind} {patch.namespace}/{patch.name}"
            lines.append(f"  PATCH {target} ({patch.patch_type})")
            lines.append(f"    {patch.json()}")
        return lines


# -- reading recorded objects ------------------------------------------------------------


def check_slot(slot: str) -> str:
    if slot not in SLOTS:
        raise ValueError(f"unknown slot {slot!r} (expected blue or green)")
    return slot


def check_weight(weight: object) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
        raise ValueError(f"weight must be a whole number from 0 to 100, got {weight!r}")
    return weight


def _meta(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    if not meta.get("name"):
        raise ValueError(f"{obj.get('kind', 'object')} has no metadata.name")
    return meta["name"], meta.get("namespace", "default")


def _slot_of_ref(route: Obj, ref: Obj) -> str:
    name = str(ref.get("name", ""))
    slot = name.removeprefix(SERVICE_PREFIX)
    if not name.startswith(SERVICE_PREFIX) or slot not in SLOTS:
        raise ValueError(f"{route['kind']} {_meta(route)[0]} sends traffic to {name!r}, not a slot Service")
    return slot


def _canary_value(rule: Obj) -> str | None:
    """The x-canary value a rule matches on (always/never), None for the weighted rule."""
    values = {
        header.get("value")
        for match in rule.get("matches") or ()
        for header in match.get("headers") or ()
        if str(header.get("name", "")).lower() == CANARY_HEADER
    }
    if len(values) > 1:
        raise ValueError(f"a route rule matches x-canary on several values: {sorted(values)}")
    return values.pop() if values else None


@dataclass(frozen=True)
class _RouteView:
    """Where the three owned rules sit in a route's `spec.rules`."""

    route: Obj
    always: int
    never: int
    weighted: int

    @classmethod
    def of(cls, route: Obj, kind: str) -> _RouteView:
        if route.get("kind") != kind:
            raise ValueError(f"expected a {kind}, got {route.get('kind')!r}")
        found: dict[str | None, int] = {}
        for index, rule in enumerate((route.get("spec") or {}).get("rules") or ()):
            value = _canary_value(rule)
            if value in found:
                raise ValueError(f"{kind} {_meta(route)[0]} has two rules for x-canary={value or '(none)'}")
            found[value] = index
        missing = [label for label, key in (("x-canary: always", "always"), ("x-canary: never", "never"),
                                            ("weighted", None)) if key not in found]  # fmt: skip
        if missing:
            raise ValueError(f"{kind} {_meta(route)[0]} has no {' or '.join(missing)} rule")
        return cls(route, found["always"], found["never"], found[None])

    def rule(self, index: int) -> Obj:
        rule: Obj = self.route["spec"]["rules"][index]
        return rule

    def forced_slot(self, index: int) -> str:
        refs: Sequence[Obj] = self.rule(index).get("backendRefs") or []
        if len(refs) != 1:
            kind, name = self.route["kind"], _meta(self.route)[0]
            raise ValueError(f"{kind} {name}: an x-canary rule needs exactly one backendRef")
        return _slot_of_ref(self.route, refs[0])

    def roles(self) -> tuple[str, str]:
        """(stable, candidate) as the x-canary rules say."""
        stable, candidate = self.forced_slot(self.never), self.forced_slot(self.always)
        if stable == candidate:
            raise ValueError(f"{self.route['kind']} {_meta(self.route)[0]} forces both x-canary values to {stable}")
        return stable, candidate

    def raw_weights(self) -> dict[str, int]:
        weights = dict.fromkeys(SLOTS, 0)
        for ref in self.rule(self.weighted).get("backendRefs") or ():
            weights[_slot_of_ref(self.route, ref)] += int(ref.get("weight", 1))  # Gateway API default: 1
        return weights

    def mirrored_to(self) -> str | None:
        """The slot the weighted rule mirrors to (RequestMirror), None when it mirrors nothing."""
        for item in self.rule(self.weighted).get("filters") or ():
            if item.get("type") == MIRROR:
                return _slot_of_ref(self.route, (item.get("requestMirror") or {}).get("backendRef") or {})
        return None

    def shares(self) -> dict[str, int]:
        """Percent of unforced traffic per slot (weights are relative in the Gateway API)."""
        weights = self.raw_weights()
        total = sum(weights.values())
        return {slot: round(100 * weight / total) if total else 0 for slot, weight in weights.items()}


# -- building route patches --------------------------------------------------------------


def _retarget(refs: Sequence[Obj], slot: str) -> list[dict[str, Any]]:
    """The rule's single backendRef, pointed at `slot`'s Service (port and extras kept)."""
    ref = dict(copy.deepcopy(refs[0]))
    ref["name"] = SERVICE_PREFIX + slot
    return [ref]


def _weighted(refs: Sequence[Obj], route: Obj, weights: Mapping[str, int]) -> list[dict[str, Any]]:
    """One backendRef per slot with its new weight; a slot missing from the rule is added."""
    by_slot: dict[str, dict[str, Any]] = {}
    for ref in refs:
        by_slot.setdefault(_slot_of_ref(route, ref), dict(copy.deepcopy(ref)))
    if not by_slot:
        raise ValueError(f"{route['kind']} {_meta(route)[0]}: the weighted rule has no backendRefs")
    template = next(iter(by_slot.values()))
    out = []
    for slot in SLOTS:
        ref = by_slot.get(slot) or {**copy.deepcopy(template), "name": SERVICE_PREFIX + slot}
        ref["weight"] = weights[slot]
        out.append(ref)
    return out


def _mirror(rule: dict[str, Any], candidate: str | None) -> None:
    """Point the rule's RequestMirror filter at `candidate`'s Service, or drop it (None).
    Other filters stay as they are."""
    filters = [item for item in rule.get("filters") or () if item.get("type") != MIRROR]
    if candidate is not None:
        port = next((ref.get("port") for ref in rule.get("backendRefs") or () if ref.get("port")), None)
        backend: dict[str, Any] = {"name": SERVICE_PREFIX + candidate, **({"port": port} if port else {})}
        filters.append({"type": MIRROR, "requestMirror": {"backendRef": backend}})
    if filters:
        rule["filters"] = filters
    else:
        rule.pop("filters", None)


def _route_patch(
    view: _RouteView, stable: str, candidate: str, weight: int, shadow: bool | None = None
) -> K8sPatch | None:
    """The patch that gives the route these roles and weight; `shadow` True mirrors the
    weighted rule to the candidate, False stops mirroring, None keeps what the route has."""
    route = view.route
    for index in (view.always, view.never):
        view.forced_slot(index)  # exactly one slot Service, or ValueError
    rules = copy.deepcopy(list(route["spec"]["rules"]))
    rules[view.always]["backendRefs"] = _retarget(rules[view.always]["backendRefs"], candidate)
    rules[view.never]["backendRefs"] = _retarget(rules[view.never]["backendRefs"], stable)
    weights = {stable: 100 - weight, candidate: weight}
    rules[view.weighted]["backendRefs"] = _weighted(rules[view.weighted].get("backendRefs") or (), route, weights)
    if shadow is not None:
        _mirror(rules[view.weighted], candidate if shadow else None)
    if rules == list(route["spec"]["rules"]):
        return None
    name, namespace = _meta(route)
    body: dict[str, Any] = {"spec": {"rules": rules}}
    version = (route.get("metadata") or {}).get("resourceVersion")
    if version:
        body = {"metadata": {"resourceVersion": version}, **body}
    return K8sPatch(route["kind"], name, namespace, MERGE_PATCH, body)


def _routing_plan(action: str, summary: str, httproute: Obj, grpcroute: Obj, stable: str, candidate: str,
                  weight: int, shadow: bool | None = False) -> K8sPlan:  # fmt: skip
    """Both routes to these roles and weight. Mirroring (HTTPRoute only) stops unless
    `shadow` says otherwise: only a weight change keeps it (None)."""
    http, grpc = _RouteView.of(httproute, "HTTPRoute"), _RouteView.of(grpcroute, "GRPCRoute")
    patches = (_route_patch(http, stable, candidate, weight, shadow), _route_patch(grpc, stable, candidate, weight))
    return K8sPlan(action, summary, tuple(patch for patch in patches if patch))


def _current(httproute: Obj) -> tuple[str, str, int]:
    view = _RouteView.of(httproute, "HTTPRoute")
    stable, candidate = view.roles()
    return stable, candidate, view.shares()[candidate]


# -- the commands ------------------------------------------------------------------------


def plan_weight(
    httproute: Obj, grpcroute: Obj, stable: str, candidate: str, weight: int, deployments: Iterable[Obj]
) -> K8sPlan:
    """Send `weight` percent of unforced REST and gRPC traffic to `candidate`, the rest to `stable`.

    The roles must be the ones the HTTPRoute's x-canary rules already state (a role change
    is `switch` or `promote`); the GRPCRoute is brought in line with them. A weight above 0
    needs the candidate ready and rolled out; 0 (a rollback) needs nothing.
    """
    check_slot(stable)
    check_slot(candidate)
    check_weight(weight)
    if stable == candidate:
        raise ValueError(f"stable and candidate must be different slots, got {stable} for both")
    current_stable, current_candidate, current = _current(httproute)
    if (stable, candidate) != (current_stable, current_candidate):
        raise ValueError(
            f"the routes have stable={current_stable} candidate={current_candidate}, not stable={stable} "
            f"candidate={candidate}; use switch or promote to change roles"
        )
    if weight > 0:
        _require_ready(deployments, candidate, f"send {weight}% to the candidate")
    summary = f"candidate {candidate} {current}% -> {weight}% (stable {stable} {100 - weight}%)"
    return _routing_plan("weight", summary, httproute, grpcroute, stable, candidate, weight, shadow=None)


def plan_shadow(httproute: Obj, grpcroute: Obj, on: bool, deployments: Iterable[Obj]) -> K8sPlan:
    """Mirror unforced REST traffic to the candidate (answers discarded), or stop; roles and
    weights stay. Mirroring needs the candidate ready and rolled out (its old pods would
    answer the copies and be judged in its place)."""
    stable, candidate, current = _current(httproute)
    if on:
        _require_ready(deployments, candidate, "mirror traffic to the candidate")
    summary = f"mirror stable traffic to candidate {candidate}" if on else "stop mirroring"
    return _routing_plan("shadow", summary, httproute, grpcroute, stable, candidate, current, shadow=on)


def plan_rollback(httproute: Obj, grpcroute: Obj) -> K8sPlan:
    """The candidate goes to 0% at once; roles stay, the candidate keeps running."""
    stable, candidate, current = _current(httproute)
    summary = f"candidate {candidate} {current}% -> 0% (stable {stable} 100%)"
    return _routing_plan("rollback", summary, httproute, grpcroute, stable, candidate, 0)


@dataclass(frozen=True)
class _Rollout:
    """A Deployment's rollout, read as `kubectl rollout status` reads it."""

    desired: int
    pods: int
    updated: int
    ready: int
    observed: bool

    @classmethod
    def of(cls, deployment: Obj) -> _Rollout:
        spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
        observed = int(status.get("observedGeneration") or 0) >= int(deployment["metadata"].get("generation") or 0)
        pods, updated, ready = (int(status.get(key) or 0) for key in ("replicas", "updatedReplicas", "readyReplicas"))
        return cls(int(spec.get("replicas", 1)), pods, updated, ready, observed)

    @property
    def complete(self) -> bool:
        """As `kubectl rollout status`: the controller has seen the current spec, and every
        wanted pod runs it, no old pod left."""
        return self.current_only and self.updated >= self.desired

    @property
    def current_only(self) -> bool:
        """No old pod answers for the slot (what moving traffic to it needs; a scale-up by the
        HPA, or a quota that holds new pods back, is not a rollout)."""
        return self.observed and self.pods == self.updated

    def progress(self) -> str:
        if not self.observed:
            return "the Deployment controller has not yet picked up its new spec"
        return f"{self.updated} of {self.desired} pods updated, {max(0, self.pods - self.updated)} old still serving"


def _require_ready(deployments: Iterable[Obj], slot: str, action: str) -> Obj:
    """The slot's Deployment, if traffic may move to it: a ready replica, and a finished rollout.

    Until a rollout finishes the old pods stay ready (maxUnavailable 0) and the Service sends
    them the slot's traffic: a slot still rolling out (or stuck, its new pods crash-looping)
    would get traffic, or be promoted, on the image it is leaving."""
    deployment = _deployments_by_slot(deployments).get(slot)
    if deployment is None:
        raise ValueError(f"cannot {action}: no Deployment for slot {slot}")
    rollout, name = _Rollout.of(deployment), _meta(deployment)[0]
    if rollout.ready < 1:
        raise ValueError(f"cannot {action}: slot {slot} ({name}) has no ready replica")
    if not rollout.current_only:
        raise ValueError(
            f"cannot {action}: slot {slot} ({name}) is still rolling out to {_image(deployment)} "
            f"({rollout.progress()}); wait until `canary --target k8s status` shows its rollout complete "
            "(stuck? `deploy` another version to it)"
        )
    return deployment


def plan_switch(httproute: Obj, grpcroute: Obj, deployments: Iterable[Obj]) -> K8sPlan:
    """Blue-green cut-over: the candidate becomes stable at 100%, the old stable becomes the
    idle candidate at 0% and stays warm, so a second switch is an instant way back."""
    deployments = list(deployments)
    stable, candidate, _ = _current(httproute)
    _require_ready(deployments, candidate, "switch")
    summary = f"{candidate} becomes stable at 100%, {stable} idle candidate at 0%"
    return _routing_plan("switch", summary, httproute, grpcroute, candidate, stable, 0)


def plan_promote(httproute: Obj, grpcroute: Obj, deployments: Iterable[Obj]) -> K8sPlan:
    """The candidate becomes stable at 100% (routes as `switch`); it must be ready and run a
    different image than stable. Moving the MLflow alias is the caller's step."""
    deployments = list(deployments)
    stable, candidate, _ = _current(httproute)
    promoted = _require_ready(deployments, candidate, "promote")
    current = _deployments_by_slot(deployments).get(stable)
    image = _image(promoted)
    if current is not None and _image(current) == image:
        raise ValueError(f"nothing to promote: {stable} and {candidate} both run {image}")
    summary = f"{candidate} ({image}) becomes stable at 100%, {stable} idle candidate at 0%"
    return _routing_plan("promote", summary, httproute, grpcroute, candidate, stable, 0)


def plan_deploy(deployment: Obj, image: str, *, routes: Iterable[Obj] = ()) -> K8sPlan:
    """Set the slot's Bento image (a rolling update). With `routes` given, refuse a slot that
    gets traffic: new Bentos go to the idle candidate (weight 0), as with the nginx stack."""
    if not isinstance(image, str) or not _IMAGE.match(image):
        raise ValueError(f"not an image reference: {image!r}")
    name, namespace = _meta(deployment)
    slot = slot_of_deployment(deployment)
    current = _image(deployment)
    if current == image:
        return K8sPlan("deploy", f"{slot} already runs {image}", ())
    for route in routes:
        kind = route.get("kind")
        if kind not in ("HTTPRoute", "GRPCRoute"):
            raise ValueError(f"expected an HTTPRoute or GRPCRoute, got {kind!r}")
        share = _RouteView.of(route, kind).shares()[slot]
        if share:
            raise ValueError(f"slot {slot} gets {share}% of {kind} traffic; deploy to the idle slot or roll back first")
    body = {"spec": {"template": {"spec": {"containers": [{"name": CONTAINER, "image": image}]}}}}
    patch = K8sPatch("Deployment", name, namespace, STRATEGIC_MERGE_PATCH, body)
    return K8sPlan("deploy", f"{slot} {current} -> {image}", (patch,))


def image_for_version(deployment: Obj, version: int) -> str:
    """The slot's current image repository with tag v<version> (`canary deploy 7`)."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"model version must be a positive whole number, got {version!r}")
    repository = re.sub(r"(@sha256:[0-9a-f]+)$", "", _image(deployment))
    if re.search(r":[^/]+$", repository):
        repository = repository.rsplit(":", 1)[0]
    return f"{repository}:v{version}"


# -- status ------------------------------------------------------------------------------


def slot_of_deployment(deployment: Obj) -> str:
    labels = (deployment.get("metadata") or {}).get("labels") or {}
    if SLOT_LABEL not in labels:
        raise ValueError(f"Deployment {_meta(deployment)[0]} has no {SLOT_LABEL} label")
    return check_slot(labels[SLOT_LABEL])


def _deployments_by_slot(deployments: Iterable[Obj]) -> dict[str, Obj]:
    return {slot_of_deployment(deployment): deployment for deployment in deployments}


def _image(deployment: Obj) -> str:
    containers = (((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or ()
    for container in containers:
        if container.get("name") == CONTAINER:
            return str(container.get("image", ""))
    raise ValueError(f"Deployment {_meta(deployment)[0]} has no container named {CONTAINER!r}")


def read_status(deployments: Iterable[Obj], httproute: Obj, grpcroute: Obj) -> dict[str, Any]:
    """Slots, roles, images, model versions, replicas and weights, as `canary status --json`."""
    http, grpc = _RouteView.of(httproute, "HTTPRoute"), _RouteView.of(grpcroute, "GRPCRoute")
    stable, candidate = http.roles()
    http_shares, grpc_shares = http.shares(), grpc.shares()
    by_slot = _deployments_by_slot(deployments)
    slots: dict[str, Any] = {}
    for slot in SLOTS:
        deployment = by_slot.get(slot)
        entry: dict[str, Any] = {
            "role": "stable" if slot == stable else "candidate",
            "weight": http_shares[slot],
            "grpc_weight": grpc_shares[slot],
            "deployment": None,
        }
        if deployment is not None:
            image, rollout = _image(deployment), _Rollout.of(deployment)
            tag = _VERSION_TAG.search(image)
            entry.update(
                deployment=_meta(deployment)[0],
                image=image,
                model_version=int(tag.group(1)) if tag else None,
                replicas=rollout.desired,
                ready_replicas=rollout.ready,
                updated_replicas=rollout.updated,
                rollout_complete=rollout.complete,
            )
        slots[slot] = entry
    return {
        "stable": stable,
        "candidate": candidate,
        "weight": http_shares[candidate],
        "grpc_weight": grpc_shares[candidate],
        # False when someone edited one route by hand: the next weight/rollback heals it.
        "consistent": grpc.roles() == (stable, candidate) and grpc_shares == http_shares,
        "shadow": http.mirrored_to() == candidate,
        "slots": slots,
    }
