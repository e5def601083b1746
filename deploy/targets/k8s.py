"""A Kubernetes cluster (`--target k8s`) as a `ReleaseTarget`: `deploy/k8s_target.py` reads the
Gateway API routes and slot Deployments, the pure `deploy/k8s_plan.py` plans, and the patches
go to the API server. Where a weight change goes: `K8sTarget.weight` -> HTTPRoute and
GRPCRoute backendRef weights.

- `gate` loads both slots through the Gateway (CANARY_K8S_GATEWAY_REST / _GRPC), forced by
  the routes' `x-canary: never|always` rules, and checks every answer's model version against
  the slot's image tag (`:vN`): the Gateway stamps no slot header, so the version is what
  tells the slots apart, and a gate whose slots do not carry two different versions is
  refused.
- `rollout` walks the same steps as on the local stack (deploy/rollout.py `walk_steps`).
- `shadow` is a `RequestMirror` filter on the HTTPRoute; `history` lives in a ConfigMap of
  the namespace (deploy/k8s_history.py), so everyone sees one trail.

Refused here in one line (never done on the local stack instead): `up`/`down` (the cluster's
objects are applied with kustomize, see deploy/k8s/README.md) and a promote bake (it watches
a slot's /metrics, which the CLI does not reach on a cluster; use your Prometheus alerts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deploy.targets.base import Applied, GateRequest, Say, Unsupported, parse_duration
from models.errors import CanaryError
from models.home import CanaryHome

NAME = "k8s"


class KubernetesTarget:
    def __init__(self, home: CanaryHome, cluster=None, settings=None) -> None:
        self.name, self.home = NAME, home
        self._cluster, self._settings = cluster, settings

    @property
    def settings(self):
        if self._settings is None:
            from deploy.k8s_target import K8sSettings

            self._settings = K8sSettings()
        return self._settings

    @property
    def cluster(self):
        if self._cluster is None:
            from deploy.k8s_target import k8s_target

            self._cluster = k8s_target(self.settings)
        return self._cluster

    def _applied(self, plan, extra: list[str] | None = None, exit_code: int = 0) -> Applied:
        lines = [*plan.describe(), *(extra or []), *self.cluster.warnings]
        self.cluster.warnings.clear()
        return Applied(lines, exit_code)

    def up(self, say: Say) -> list[str]:
        raise Unsupported(NAME, "up", "apply the manifests with `kubectl apply -k deploy/k8s/overlays/dev`")

    def down(self) -> list[str]:
        raise Unsupported(NAME, "down", "delete the manifests with `kubectl delete -k deploy/k8s/overlays/dev`")

    def deploy(self, release: str, dry_run: bool) -> Applied:
        return self._applied(self.cluster.deploy(release, dry_run))

    def weight(self, percent: int, dry_run: bool) -> Applied:
        return self._applied(self.cluster.weight(percent, dry_run))

    def switch(self, dry_run: bool) -> Applied:
        return self._applied(self.cluster.switch(dry_run))

    def rollback(self, reason: str, dry_run: bool) -> Applied:
        return self._applied(self.cluster.rollback(dry_run, reason))

    def shadow(self, on: bool, dry_run: bool) -> Applied:
        return self._applied(self.cluster.shadow(on, dry_run))

    def promote(self, dry_run: bool, bake: str | None, say: Say) -> Applied:
        if bake is not None and parse_duration(bake, allow_zero=True) > 0:
            raise Unsupported(NAME, "promote --bake", "the bake watches a slot's /metrics, not reachable from here yet")
        plan, version = self.cluster.promote(dry_run)
        extra = []
        if not dry_run and version is not None:
            from models.registry import CHAMPION, Registry

            self.home.activate()
            Registry(self.home).set_alias(CHAMPION, int(version))
            extra.append(f"MLflow alias champion -> version {version}")
        return self._applied(plan, extra)

    def status(self) -> dict[str, Any]:
        status = self.cluster.status()
        gates = [entry for entry in self.cluster.history.entries() if entry.get("action") == "gate"]
        status["last_gate"] = gates[-1] if gates else None
        return status

    def format_status(self, status: dict[str, Any]) -> str:
        from deploy.k8s_target import format_k8s_status

        text = format_k8s_status(status)
        gate = status.get("last_gate")
        if gate:
            text += f"\nlast gate: {gate['detail']} ({gate['time']}): {gate.get('reason', '')}"
        return text

    def history(self) -> list[dict[str, Any]]:
        return self.cluster.history.entries()

    # -- gate and rollout -----------------------------------------------------------------
    def gate_targets(self):
        """Both slots through the Gateway, forced by the routes' x-canary rules, each with the
        model version that must answer."""
        from loadtest.targets import Target

        s = self.settings
        if not s.gateway_rest:
            raise CanaryError(
                "the k8s gate loads the slots through the Gateway: set CANARY_K8S_GATEWAY_REST to its REST "
                "address (e.g. http://10.0.0.7) and CANARY_K8S_GATEWAY_GRPC to its gRPC listener (host:50051)"
            )
        status = self.cluster.status()
        versions = {role: status["slots"][status[role]].get("model_version") for role in ("stable", "candidate")}
        if None in versions.values() or versions["stable"] == versions["candidate"]:
            raise CanaryError(
                f"the k8s gate tells the slots apart by model version, and stable runs version "
                f"{versions['stable'] or '?'}, candidate {versions['candidate'] or '?'}: deploy images tagged "
                "with two different :vN versions"
            )
        try:
            return tuple(
                Target(s.gateway_rest, s.gateway_grpc, {"x-canary": force}, model_version=str(versions[role]))
                for force, role in (("never", "stable"), ("always", "candidate"))
            )
        except ValueError as exc:
            raise CanaryError(f"CANARY_K8S_GATEWAY_*: {exc}") from None

    def run_gate(self, options, label: str) -> Any:
        from deploy.rollout import gate_folder, recorded_gate

        stable, candidate = self.gate_targets()
        status = self.cluster.status()
        self.home.activate()
        outcome, record = recorded_gate(
            stable, candidate, candidate.model_version, options, gate_folder(self.home, label), self.home
        )
        detail = f"{record['verdict']} at {status['weight']}% for version {candidate.model_version}"
        self.cluster.record("gate", detail, record["summary"], exit_code=record["exit_code"], report=record["report"])
        return outcome

    def gate(self, request: GateRequest, say: Say) -> Applied:
        outcome = self.run_gate(_options(request), "manual")
        verdict = outcome.verdict.verdict if outcome.verdict else "error"
        lines = [f"gate {verdict}: {outcome.verdict.summary if outcome.verdict else outcome.error}"]
        lines += [f"  {path}" for path in (outcome.result_path, outcome.report_path, *outcome.plots) if path]
        lines += self.cluster.warnings
        self.cluster.warnings.clear()
        return Applied(lines, outcome.exit_code)

    def rollout(self, steps: list[int], request: GateRequest, bake: str | None, say: Say) -> Applied:
        from deploy.rollout import check_steps, walk_steps

        if request.source != "locust":
            raise Unsupported(NAME, f"rollout --source {request.source}", "live verdicts read the slots' /metrics")
        if bake is not None and parse_duration(bake, allow_zero=True) > 0:
            raise Unsupported(NAME, "rollout --bake", "the bake watches a slot's /metrics, not reachable from here yet")
        check_steps(steps)
        self.gate_targets()  # refuse before any weight moves
        code = walk_steps(_ClusterRelease(self, say), steps, _options(request), say)
        warnings, self.cluster.warnings[:] = list(self.cluster.warnings), []
        return Applied(warnings, code)


def _options(request: GateRequest):
    from deploy.rollout import GateOptions

    return GateOptions(request.duration_s, request.users, request.spawn_rate, request.thresholds)


@dataclass
class _ClusterRelease:
    """`deploy.rollout.Release` on a cluster: weights through the routes, promote without bake."""

    target: KubernetesTarget
    say: Say

    def set_weight(self, percent: int, reason: str) -> None:
        self.target.cluster.weight(percent, reason=reason)

    def gate(self, options, label: str) -> Any:
        return self.target.run_gate(options, label)

    def rollback(self, reason: str) -> None:
        self.target.cluster.rollback(reason=reason)

    def promote(self) -> int:
        for line in self.target.promote(False, None, self.say).lines:
            self.say(line)
        self.say("promoted (no bake on --target k8s: watch the new stable with your Prometheus alerts)")
        return 0

    def interrupted(self, exc: BaseException) -> str | None:
        try:
            if self.target.cluster.status()["weight"] == 0:
                return None
            why = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"crashed ({type(exc).__name__})"
            self.target.cluster.rollback(reason=f"rollout {why}: traffic held at 0%")
            return f"rollout {why}: candidate traffic set to 0% on the routes"
        except CanaryError as error:
            return (
                f"rollout stopped and the routes could not be rolled back ({error}): run `canary --target k8s rollback`"
            )
