"""`canary gate`, `canary rollout` and `canary promote`: the decisions of a release.

The gate loads stable and candidate side by side through nginx, each forced with
`X-Canary: never|always` and the stack's force token, so each slot is measured on its own;
every answer must come from the slot it was sent to, with that slot's model version (the
router never fails a forced request over, and the gate checks `X-Canary-Slot`). A rollout
walks the weight steps, gates each one, rolls back on a failed gate (or on two inconclusive
gates in a row) and promotes after the last step; a promote checks the candidate, routes
all traffic to it and bakes: the new stable is watched on live traffic while the old one
stays warm, and a breach switches back by itself. Ctrl-C or a crash leaves the candidate at
0% with a note `canary status` shows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from deploy.release import plan_finish_promote, plan_promote, plan_revert_promote, plan_rollback, plan_weight
from deploy.stack import LocalStack
from models.errors import CanaryError

Say = Callable[[str], None]
EXIT_PASS, EXIT_FAIL, EXIT_HARNESS = 0, 1, 2


@dataclass(frozen=True)
class GateOptions:
    duration_s: float = 30.0
    users: int = 16
    spawn_rate: float = 16.0
    thresholds: Path | None = None  # None: loadtest/thresholds.yaml
    source: str = "locust"  # locust: load both slots; live: wait duration_s, judge the step's real traffic


class Release(Protocol):
    """What `walk_steps` needs from a target: move the weight, gate, roll back, promote,
    and leave traffic safe when the walk is interrupted."""

    def set_weight(self, percent: int, reason: str) -> None: ...
    def gate(self, options: GateOptions, label: str) -> Any: ...
    def rollback(self, reason: str) -> None: ...
    def promote(self) -> int: ...
    def interrupted(self, exc: BaseException) -> str | None: ...


def check_steps(steps: Sequence[int]) -> None:
    if not steps or any(not 0 < s <= 100 for s in steps) or list(steps) != sorted(set(steps)):
        raise CanaryError("--steps must be increasing percentages in 1-100, e.g. 5,25,50,100")


def walk_steps(release: Release, steps: Sequence[int], options: GateOptions, say: Say) -> int:
    """Weight steps, each gated, then promote; returns the exit code (0 promoted, 1 rolled
    back on a failed or twice-inconclusive gate, 2 the gate itself could not run). Any
    target: the local stack, compose, a cluster."""
    from loadtest.gate import INCONCLUSIVE

    check_steps(steps)
    try:
        for step in steps:
            release.set_weight(step, f"rollout step {step}%")
            say(f"== rollout: {step}% of traffic on the candidate; gating for {options.duration_s:g}s ==")
            inconclusive = 0
            while True:
                outcome = release.gate(options, f"step{step}")
                verdict = outcome.verdict.verdict if outcome.verdict else "error"
                say(f"gate at {step}%: {verdict}: {outcome.verdict.summary if outcome.verdict else outcome.error}")
                if outcome.exit_code == EXIT_PASS:
                    break
                if verdict == INCONCLUSIVE and inconclusive == 0:
                    inconclusive += 1
                    say("inconclusive: gating this step once more")
                    continue
                reason = f"gate {verdict} at {step}%: " + (
                    outcome.verdict.summary if outcome.verdict else str(outcome.error)
                )
                release.rollback(reason)
                say(f"rolled back to 0%: {reason}")
                return EXIT_HARNESS if outcome.exit_code == EXIT_HARNESS else EXIT_FAIL
        return release.promote()
    except BaseException as exc:  # Ctrl-C or a crash: leave traffic at a safe, stated weight
        message = release.interrupted(exc)
        if message:
            say(message)
        raise


def recorded_gate(
    stable: Any, candidate: Any, version: str | None, options: GateOptions, out_dir: Path, home: Any,
    force_token: str | None = None,
) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """One gate run, logged to the candidate's MLflow model version; returns the outcome and
    the record every target keeps as its last verdict."""
    from loadtest.run_gate import DEFAULT_THRESHOLDS, log_to_mlflow, run_gate

    outcome = run_gate(
        stable, candidate, options.duration_s, options.users, options.spawn_rate, out_dir,
        options.thresholds or DEFAULT_THRESHOLDS, force_token=force_token,
    )  # fmt: skip
    verdict = outcome.verdict.verdict if outcome.verdict else "error"
    summary = outcome.verdict.summary if outcome.verdict else (outcome.error or "the gate could not run")
    mlflow_uri = None
    if version:
        try:
            mlflow_uri = log_to_mlflow(outcome, home.registered_model, version)
        except Exception as exc:  # noqa: BLE001 - a tracking outage must not hide the verdict
            summary += f" (not logged to MLflow: {exc})"
    record = {
        "verdict": verdict, "summary": summary, "exit_code": outcome.exit_code,
        "report": str(outcome.report_path) if outcome.report_path else None,
        "result": str(outcome.result_path) if outcome.result_path else None, "mlflow": mlflow_uri,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    return outcome, record


def gate_folder(home: Any, label: str) -> Path:
    """Where one gate's Locust log, result, report and plots go."""
    return Path(home.home) / "gates" / f"{time.strftime('%Y%m%dT%H%M%S')}-{label}"


def gate_targets(stack: LocalStack):
    """Both slots through nginx, forced, each with the slot name and model version that
    must answer (a mismatch fails the request)."""
    from loadtest.targets import Target

    s = stack.settings
    state = stack.store.load()
    rest, grpc = f"http://{s.host}:{s.nginx_rest_port}", f"{s.host}:{s.nginx_grpc_port}"
    targets = []
    for force, slot in (("never", state.stable), ("always", state.candidate)):
        version = state.slots[slot].model_version if slot else None
        targets.append(Target(rest, grpc, {"X-Canary": force}, slot=slot, model_version=version))
    return targets[0], targets[1]


def run_gate_on_stack(stack: LocalStack, options: GateOptions, label: str = "manual"):
    """One gate of the current candidate; the verdict is saved in the state, the history
    and on the candidate's MLflow model version."""
    state = stack.store.load()
    if state.candidate is None:
        raise CanaryError("gate needs a candidate: run `canary deploy <version>` first")
    version = state.slots[state.candidate].model_version
    stable, candidate = gate_targets(stack)
    outcome, record = recorded_gate(
        stable, candidate, version, options, gate_folder(stack.home, label), stack.home, stack.force_token()
    )
    record["weight"] = state.weight
    with stack.store.locked():
        current = stack.store.load()
        stack.store.save(replace(current, last_gate=record))
    stack.store.history.append(
        "gate", f"{record['verdict']} at {state.weight}% for {state.slots[state.candidate].bento}", record["summary"]
    )
    return outcome


def rollout(
    stack: LocalStack, steps: Sequence[int], options: GateOptions, say: Say, on_champion: Callable[[str], None],
    bake_s: float | None = None,
) -> int:  # fmt: skip
    """`walk_steps` on the local (or compose) stack; the promote at the end bakes `bake_s`.
    With `options.source == "live"` each step waits `options.duration_s` and is judged on the
    real traffic it got (`deploy.live_gate.live_step`; a second look, on the longer window, when
    the first is inconclusive)."""
    check_steps(steps)
    if options.source not in ("locust", "live"):
        raise CanaryError(f"rollout --source must be locust or live, got {options.source!r}")
    if stack.store.load().candidate is None:
        raise CanaryError("rollout needs a candidate: run `canary deploy <version>` first")
    bake = stack.settings.bake_s if bake_s is None else bake_s
    return walk_steps(_StackRelease(stack, bake, say, on_champion), steps, options, say)


@dataclass
class _StackRelease:
    """`Release` on a `LocalStack`: plans from deploy/release.py, executed by the stack."""

    stack: LocalStack
    bake_s: float
    say: Say
    on_champion: Callable[[str], None]
    step_started: float = 0.0  # when the current weight took effect (the live window's start)
    looks: int = 0  # live verdicts taken at this step (a second look waits another step duration)

    def set_weight(self, percent: int, reason: str) -> None:
        self.stack.execute(plan_weight(self.stack.store.load(), percent, reason=reason))
        self.step_started, self.looks = time.time(), 0

    def gate(self, options: GateOptions, label: str) -> Any:
        if options.source == "live":
            from deploy.live_gate import live_step

            self.looks += 1
            return live_step(self.stack, options, self.step_started, self.say, self.looks)
        return run_gate_on_stack(self.stack, options, label=label)

    def rollback(self, reason: str) -> None:
        self.stack.execute(plan_rollback(self.stack.store.load(), reason=reason))

    def promote(self) -> int:
        return promote(self.stack, self.bake_s, self.say, self.on_champion)

    def interrupted(self, exc: BaseException) -> str | None:
        state = self.stack.store.load()
        if state.baking:
            self.stack.execute(
                plan_revert_promote(state, f"rollout interrupted during the bake ({type(exc).__name__})")
            )
            return "rollout interrupted during the bake: the old stable has all traffic again"
        if state.candidate is not None and state.weight > 0:
            why = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"crashed ({type(exc).__name__})"
            self.stack.execute(plan_rollback(state, reason=f"rollout {why} at {state.weight}%: traffic held at 0%"))
            return f"rollout {why}: candidate traffic set to 0%; `canary status` shows it"
        return None


def promote(stack: LocalStack, bake_s: float, say: Say, on_champion: Callable[[str], None] | None) -> int:
    """Check the candidate, give it all traffic, bake, then stop the old stable and move the
    champion alias. Returns 0 promoted, 1 switched back because the bake found a breach.
    A bake that was interrupted (its state is kept) is resumed by calling this again."""
    import datetime

    from deploy.bake import BakeLimits, watch

    state = stack.store.load()
    if not state.baking:
        since = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        state = stack.execute(plan_promote(state, bake_s, since))
        if not state.baking:  # no bake: promoted in one plan
            if on_champion is not None:
                on_champion(state.slots[state.stable].model_version or "")
            say(f"promoted: slot {state.stable} is stable (no bake)")
            return EXIT_PASS
        say(f"slot {state.stable} has all traffic; baking {bake_s:g}s against the gate's SLOs "
            f"(slot {state.candidate} kept warm)")  # fmt: skip
    else:
        bake_s = float(state.baking.get("bake_s", bake_s))
        say(f"resuming the bake of slot {state.stable} ({bake_s:g}s)")
    slot, s = state.stable, stack.settings
    limits = BakeLimits.from_thresholds(window_s=s.bake_window_s, min_requests=s.bake_min_requests)
    result = watch(
        lambda: stack.slot_metrics(slot), lambda: stack.slot_problem(slot), bake_s, limits,
        interval_s=s.bake_interval_s, say=say,
    )  # fmt: skip
    if not result.passed:
        reason = f"bake of slot {slot} failed: {result.reason}"
        stack.execute(plan_revert_promote(stack.store.load(), reason))
        say(f"switched back: {reason}")
        return EXIT_FAIL
    stack.execute(plan_finish_promote(stack.store.load(), result.reason), on_champion=on_champion)
    say(f"bake passed ({result.reason}): slot {slot} is stable; MLflow alias champion moved")
    return EXIT_PASS
