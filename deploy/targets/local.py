"""The local stack (`--target local`, processes) and the compose stack (`--target compose`,
containers) as a `ReleaseTarget`: the pure planner (`deploy/release.py`) makes a plan, the
stack executes it (slot checks, nginx admin API, state, audit), `deploy/rollout.py` gates,
rolls out and bakes. Where a weight change goes: `LocalStack.execute` -> `set_routing`."""

from __future__ import annotations

from typing import Any

from deploy.release import ReleasePlan, plan_deploy, plan_promote, plan_rollback, plan_shadow, plan_switch, plan_weight
from deploy.stack import LocalStack
from deploy.targets.base import Applied, GateRequest, Say, parse_duration
from models.registry import CHAMPION, Registry


class StackTarget:
    """A `ReleaseTarget` over a `LocalStack` (or its compose subclass)."""

    def __init__(self, stack: LocalStack, name: str = "local") -> None:
        self.stack, self.name = stack, name

    # -- helpers ------------------------------------------------------------------------
    def _run(self, plan: ReleasePlan, dry_run: bool) -> Applied:
        lines = plan.describe()
        if dry_run:
            return Applied([*lines, plan.diff() or "(routing unchanged)"])
        after = self.stack.execute(plan, on_champion=self.move_champion)
        return Applied([*lines, f"done: stable {after.stable}, candidate {after.candidate or '-'} at {after.weight}%"])

    def move_champion(self, version: str) -> None:
        """The MLflow alias `champion` follows a promotion (after its bake passed)."""
        Registry(self.stack.home).set_alias(CHAMPION, int(version))

    def _bake_s(self, bake: str | None) -> float:
        return float(self.stack.settings.bake_s) if bake is None else parse_duration(bake, allow_zero=True)

    # -- the commands -------------------------------------------------------------------
    def up(self, say: Say) -> list[str]:
        from models.bento import find_bento

        stack = self.stack
        stack.home.require()
        state = stack.store.load()
        champion = find_bento(stack.home, "@champion") if state.slots[state.stable].bento is None else None
        state = stack.up(champion)
        s = stack.settings
        return [f"stack up: REST http://{s.host}:{s.nginx_rest_port}  gRPC {s.host}:{s.nginx_grpc_port}  "
                f"stable {state.stable}={state.slots[state.stable].bento}"]  # fmt: skip

    def down(self) -> list[str]:
        return self.stack.down()

    def deploy(self, release: str, dry_run: bool) -> Applied:
        from models.bento import find_bento

        bento, version = find_bento(self.stack.home, release)
        return self._run(plan_deploy(self.stack.store.load(), bento, version), dry_run)

    def weight(self, percent: int, dry_run: bool) -> Applied:
        return self._run(plan_weight(self.stack.store.load(), percent), dry_run)

    def switch(self, dry_run: bool) -> Applied:
        return self._run(plan_switch(self.stack.store.load()), dry_run)

    def rollback(self, reason: str, dry_run: bool) -> Applied:
        return self._run(plan_rollback(self.stack.store.load(), reason), dry_run)

    def shadow(self, on: bool, dry_run: bool) -> Applied:
        return self._run(plan_shadow(self.stack.store.load(), on), dry_run)

    def promote(self, dry_run: bool, bake: str | None, say: Say) -> Applied:
        from deploy.rollout import promote

        bake_s = self._bake_s(bake)
        state = self.stack.store.load()
        lines: list[str] = []
        if dry_run or not state.baking:
            plan = plan_promote(state, bake_s, "now")
            lines = plan.describe()
            if bake_s > 0:
                lines.append(f"  bake {bake_s:g}s, then stop slot {state.stable} and move MLflow alias champion")
            if dry_run:
                return Applied([*lines, plan.diff() or "(routing unchanged)"])
        for line in lines:
            say(line)
        return Applied([], promote(self.stack, bake_s, say, self.move_champion))

    def status(self) -> dict[str, Any]:
        return self.stack.status()

    def format_status(self, status: dict[str, Any]) -> str:
        from deploy.report import format_status

        return format_status(status)

    def history(self) -> list[dict[str, Any]]:
        return self.stack.store.history.entries()

    def gate(self, request: GateRequest, say: Say) -> Applied:
        from deploy.rollout import GateOptions, run_gate_on_stack

        options = GateOptions(request.duration_s, request.users, request.spawn_rate, request.thresholds)
        outcome = run_gate_on_stack(self.stack, options)
        verdict = outcome.verdict.verdict if outcome.verdict else "error"
        lines = [f"gate {verdict}: {outcome.verdict.summary if outcome.verdict else outcome.error}"]
        lines += [f"  {path}" for path in (outcome.result_path, outcome.report_path, *outcome.plots) if path]
        return Applied(lines, outcome.exit_code)

    def rollout(self, steps: list[int], request: GateRequest, bake: str | None, say: Say) -> Applied:
        from deploy.rollout import GateOptions, rollout

        options = GateOptions(request.duration_s, request.users, request.spawn_rate, request.thresholds, request.source)
        code = rollout(self.stack, steps, options, say, self.move_champion, bake_s=self._bake_s(bake))
        return Applied([], code)


def local_target(home) -> StackTarget:
    return StackTarget(LocalStack(home), "local")


def compose_target(home) -> StackTarget:
    from deploy.compose_target import ComposeStack

    return StackTarget(ComposeStack(home), "compose")
