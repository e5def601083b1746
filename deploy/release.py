"""The release planner: pure functions from the current state and a request to a `ReleasePlan`.

Nothing here touches a process, nginx or MLflow; `deploy.stack.LocalStack.execute` applies a
plan. So every rule (what needs a candidate, what happens to weights) is testable alone,
and `--dry-run` prints exactly what would be done.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass

from deploy.state import ReleaseState, SlotState
from models.errors import CanaryError


@dataclass(frozen=True)
class ReleasePlan:
    action: str
    before: ReleaseState
    after: ReleaseState
    start_slot: tuple[str, str] | None = None  # (slot, bento) started and checked before routing changes
    stop_slot: str | None = None  # stopped after routing changed
    champion_version: str | None = None  # MLflow alias `champion` moves here
    reason: str = ""
    # slots that gain traffic: each must be alive, ready and answer a smoke inference right
    # before routing changes, or nothing changes (a started slot is checked by its start)
    check_slots: tuple[str, ...] = ()

    def routing(self, state: ReleaseState | None = None) -> dict:
        state = state or self.after
        return {"stable": state.stable, "candidate": state.candidate, "weight": state.weight, "shadow": state.shadow}

    def describe(self) -> list[str]:
        lines = [f"plan: {self.action}" + (f" ({self.reason})" if self.reason else "")]
        if self.start_slot:
            lines.append(
                f"  start slot {self.start_slot[0]} with {self.start_slot[1]}, wait for readiness and a smoke inference"
            )
        for slot in self.check_slots:
            lines.append(f"  check slot {slot} (alive, ready, smoke inference) before routing changes")
        before, after = self.routing(self.before), self.routing()
        if before != after:
            lines.append(f"  routing: {_summary(self.before)}  ->  {_summary(self.after)}")
        if self.stop_slot:
            lines.append(f"  stop slot {self.stop_slot}")
        if self.champion_version:
            lines.append(f"  move MLflow alias champion to version {self.champion_version}")
        return lines

    def diff(self) -> str:
        """Unified diff of the routing file nginx loads (the config that changes)."""
        old = json.dumps(self.routing(self.before), indent=2, sort_keys=True).splitlines()
        new = json.dumps(self.routing(), indent=2, sort_keys=True).splitlines()
        return "\n".join(difflib.unified_diff(old, new, "routing.json (now)", "routing.json (planned)", lineterm=""))


def _summary(state: ReleaseState) -> str:
    stable = f"{state.stable}={state.slots[state.stable].bento or '-'}"
    if state.candidate is None:
        return f"{stable} 100%"
    candidate = f"{state.candidate}={state.slots[state.candidate].bento or '-'}"
    shadow = " +shadow" if state.shadow else ""
    return f"{stable} {100 - state.weight}%, {candidate} {state.weight}%{shadow}"


def _need_candidate(state: ReleaseState, action: str) -> str:
    if state.candidate is None:
        raise CanaryError(f"{action} needs a candidate: run `canary deploy <version>` first")
    return state.candidate


def _not_baking(state: ReleaseState, action: str) -> None:
    if state.baking:
        raise CanaryError(
            f"{action}: the promotion of slot {state.baking['slot']} is still baking; "
            "run `canary promote` to finish it or `canary rollback` to switch back"
        )


def shares(state: ReleaseState) -> dict[str, int]:
    """Percent of unforced traffic each slot gets."""
    out = {slot: 0 for slot in state.slots}
    out[state.stable] = 100 - (state.weight if state.candidate else 0)
    if state.candidate:
        out[state.candidate] = state.weight
    return out


def gaining_traffic(before: ReleaseState, after: ReleaseState) -> tuple[str, ...]:
    old, new = shares(before), shares(after)
    return tuple(slot for slot in sorted(new) if new[slot] > old.get(slot, 0))


def plan_initial(state: ReleaseState, bento: str, model_version: str) -> ReleasePlan:
    """`canary up` with nothing serving yet: the champion goes into the stable slot at 100%."""
    slots = {**state.slots, state.stable: SlotState(bento, model_version)}
    after = state.with_changes(slots=slots, candidate=None, weight=0, shadow=False)
    return ReleasePlan("up", state, after, start_slot=(state.stable, bento), reason="first stable release")


def plan_deploy(state: ReleaseState, bento: str, model_version: str) -> ReleasePlan:
    _not_baking(state, "deploy")
    stable = state.slots[state.stable]
    if stable.bento is None:
        raise CanaryError("nothing is serving yet: run `canary up` first")
    if stable.bento == bento:
        raise CanaryError(f"{bento} is already the stable release in slot {state.stable}")
    slot = state.idle
    slots = {**state.slots, slot: SlotState(bento, model_version)}
    after = state.with_changes(slots=slots, candidate=slot, weight=0, shadow=False, last_gate=None, note="")
    return ReleasePlan("deploy", state, after, start_slot=(slot, bento), reason=f"candidate {bento} at 0%")


def plan_weight(state: ReleaseState, weight: int, reason: str = "") -> ReleasePlan:
    _need_candidate(state, "weight")
    _not_baking(state, "weight")
    if not 0 <= weight <= 100:
        raise CanaryError(f"weight must be between 0 and 100, got {weight}")
    after = state.with_changes(weight=weight, note="")
    return ReleasePlan("weight", state, after, reason=reason, check_slots=gaining_traffic(state, after))


def plan_switch(state: ReleaseState) -> ReleasePlan:
    """Blue-green cut-over: the candidate takes all traffic, the old stable stays warm at 0%."""
    candidate = _need_candidate(state, "switch")
    after = state.with_changes(stable=candidate, candidate=state.stable, weight=0, shadow=False, note="", baking=None)
    return ReleasePlan("switch", state, after, reason=f"{candidate} takes 100%, {state.stable} kept warm",
                       check_slots=gaining_traffic(state, after))  # fmt: skip


def plan_promote(state: ReleaseState, bake_s: float, since: str) -> ReleasePlan:
    """The candidate takes 100% after a check; the old stable stays warm for the bake
    (`plan_finish_promote` stops it afterwards; with no bake, this plan does both)."""
    candidate = _need_candidate(state, "promote")
    _not_baking(state, "promote")
    version = state.slots[candidate].model_version
    if bake_s <= 0:
        after = state.with_changes(stable=candidate, candidate=None, weight=0, shadow=False, note="")
        return ReleasePlan(
            "promote", state, after, stop_slot=state.stable, champion_version=version,
            reason=f"{candidate} becomes stable (no bake)", check_slots=(candidate,),
        )  # fmt: skip
    baking = {"slot": candidate, "previous": state.stable, "since": since, "bake_s": bake_s}
    after = state.with_changes(stable=candidate, candidate=state.stable, weight=0, shadow=False, baking=baking,
                               note=f"baking: {candidate} promoted, {state.stable} kept warm for {bake_s:g}s")  # fmt: skip
    return ReleasePlan("promote", state, after, reason=f"{candidate} takes 100%, bake {bake_s:g}s",
                       check_slots=(candidate,))  # fmt: skip


def plan_finish_promote(state: ReleaseState, summary: str = "") -> ReleasePlan:
    """The bake passed: stop the old stable, move the champion alias."""
    if not state.baking:
        raise CanaryError("no promotion is baking")
    after = state.with_changes(candidate=None, weight=0, shadow=False, baking=None, note="")
    return ReleasePlan(
        "promote", state, after, stop_slot=state.baking["previous"],
        champion_version=state.slots[state.stable].model_version,
        reason=f"bake passed: {summary}" if summary else "bake passed",
    )  # fmt: skip


def plan_revert_promote(state: ReleaseState, reason: str) -> ReleasePlan:
    """The bake failed: the old stable (still warm) takes all traffic back at once."""
    if not state.baking:
        raise CanaryError("no promotion is baking")
    previous, promoted = state.baking["previous"], state.baking["slot"]
    after = state.with_changes(stable=previous, candidate=promoted, weight=0, shadow=False, baking=None,
                               note=f"promotion of {promoted} reverted: {reason}")  # fmt: skip
    return ReleasePlan("revert", state, after, reason=reason)


def plan_rollback(state: ReleaseState, reason: str = "") -> ReleasePlan:
    """The candidate to 0% at once (during a bake: the old stable takes everything back).
    Never checks a slot first: a rollback must always be possible."""
    if state.baking:
        return plan_revert_promote(state, reason or "manual rollback during the bake")
    _need_candidate(state, "rollback")
    after = state.with_changes(weight=0, shadow=False, note=f"rolled back: {reason}" if reason else "rolled back")
    return ReleasePlan("rollback", state, after, reason=reason or "manual rollback")


def plan_shadow(state: ReleaseState, on: bool) -> ReleasePlan:
    if on:
        _need_candidate(state, "shadow on")
        _not_baking(state, "shadow on")
    return ReleasePlan("shadow", state, state.with_changes(shadow=on), reason="mirror stable traffic" if on else "")
