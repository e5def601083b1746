"""A Kubernetes cluster (`--target k8s`) as a `ReleaseTarget`: `deploy/k8s_target.py` reads the
Gateway API routes and slot Deployments, the pure `deploy/k8s_plan.py` plans, and the patches
go to the API server. Where a weight change goes: `K8sTarget.weight` -> HTTPRoute and
GRPCRoute backendRef weights.

Refused here in one line (never done on the local stack instead): `up`/`down` (the cluster's
objects are applied with kustomize, see deploy/k8s/README.md), `shadow`, `gate`, `rollout`,
`history` and a promote bake, which need the gate's Locust against the Gateway and an
in-cluster audit trail; not built yet."""

from __future__ import annotations

from typing import Any

from deploy.targets.base import Applied, GateRequest, Say, Unsupported, parse_duration
from models.home import CanaryHome

NAME = "k8s"


class KubernetesTarget:
    def __init__(self, home: CanaryHome, cluster=None) -> None:
        self.name, self.home = NAME, home
        self._cluster = cluster

    @property
    def cluster(self):
        if self._cluster is None:
            from deploy.k8s_target import k8s_target

            self._cluster = k8s_target()
        return self._cluster

    def up(self, say: Say) -> list[str]:
        raise Unsupported(NAME, "up", "apply the manifests with `kubectl apply -k deploy/k8s/overlays/dev`")

    def down(self) -> list[str]:
        raise Unsupported(NAME, "down", "delete the manifests with `kubectl delete -k deploy/k8s/overlays/dev`")

    def deploy(self, release: str, dry_run: bool) -> Applied:
        return Applied(self.cluster.deploy(release.lstrip("@") if release.isdigit() else release, dry_run).describe())

    def weight(self, percent: int, dry_run: bool) -> Applied:
        return Applied(self.cluster.weight(percent, dry_run).describe())

    def switch(self, dry_run: bool) -> Applied:
        return Applied(self.cluster.switch(dry_run).describe())

    def rollback(self, reason: str, dry_run: bool) -> Applied:
        return Applied(self.cluster.rollback(dry_run).describe())

    def promote(self, dry_run: bool, bake: str | None, say: Say) -> Applied:
        if bake is not None and parse_duration(bake, allow_zero=True) > 0:
            raise Unsupported(NAME, "promote --bake", "the bake watches a slot's /metrics, not reachable from here yet")
        plan, version = self.cluster.promote(dry_run)
        lines = plan.describe()
        if not dry_run and version is not None:
            from models.registry import CHAMPION, Registry

            self.home.activate()
            Registry(self.home).set_alias(CHAMPION, int(version))
            lines.append(f"MLflow alias champion -> version {version}")
        return Applied(lines)

    def shadow(self, on: bool, dry_run: bool) -> Applied:
        raise Unsupported(NAME, "shadow", "Gateway API RequestMirror on the HTTPRoute is not wired up yet")

    def status(self) -> dict[str, Any]:
        return self.cluster.status()

    def format_status(self, status: dict[str, Any]) -> str:
        from deploy.k8s_target import format_k8s_status

        return format_k8s_status(status)

    def history(self) -> list[dict[str, Any]]:
        raise Unsupported(NAME, "history", "the cluster keeps no audit trail yet (use `kubectl get events`)")

    def gate(self, request: GateRequest, say: Say) -> Applied:
        raise Unsupported(NAME, "gate", "the gate cannot reach the Gateway's slots from here yet")

    def rollout(self, steps: list[int], request: GateRequest, bake: str | None, say: Say) -> Applied:
        raise Unsupported(NAME, "rollout", "it needs the gate, which cannot reach the Gateway's slots yet")
