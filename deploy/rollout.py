"""`canary gate` and `canary rollout`: Locust gates that decide each canary step.

The gate loads stable and candidate side by side through nginx, each forced with
`X-Canary: never|always`, so each slot is measured on its own (nginx's passive health would
hide a failing candidate from weighted totals). A rollout walks the weight steps, gates each
one, rolls back on a failed gate (or on two inconclusive gates in a row) and promotes after
the last step. Ctrl-C or a crash leaves the candidate at 0% with a note `canary status` shows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from deploy.release import plan_promote, plan_rollback, plan_weight
from deploy.stack import LocalStack
from models.errors import CanaryError

Say = Callable[[str], None]
EXIT_PASS, EXIT_FAIL, EXIT_HARNESS = 0, 1, 2


@dataclass(frozen=True)
class GateOptions:
    duration_s: float = 30.0
    users: int = 16
    spawn_rate: float = 16.0


def gate_targets(stack: LocalStack):
    from loadtest.targets import Target

    s = stack.settings
    rest, grpc = f"http://{s.host}:{s.nginx_rest_port}", f"{s.host}:{s.nginx_grpc_port}"
    return Target(rest, grpc, {"X-Canary": "never"}), Target(rest, grpc, {"X-Canary": "always"})


def run_gate_on_stack(stack: LocalStack, options: GateOptions, label: str = "manual"):
    """One gate of the current candidate; the verdict is saved in the state, the history
    and on the candidate's MLflow model version."""
    from loadtest.run_gate import log_to_mlflow, run_gate

    state = stack.store.load()
    if state.candidate is None:
        raise CanaryError("gate needs a candidate: run `canary deploy <version>` first")
    version = state.slots[state.candidate].model_version
    out_dir = stack.home.home / "gates" / f"{time.strftime('%Y%m%dT%H%M%S')}-{label}"
    stable, candidate = gate_targets(stack)
    outcome = run_gate(stable, candidate, options.duration_s, options.users, options.spawn_rate, out_dir)
    verdict = outcome.verdict.verdict if outcome.verdict else "error"
    summary = outcome.verdict.summary if outcome.verdict else (outcome.error or "the gate could not run")
    mlflow_uri = None
    if version:
        try:
            mlflow_uri = log_to_mlflow(outcome, stack.home.registered_model, version)
        except Exception as exc:  # noqa: BLE001 - a tracking outage must not hide the verdict
            summary += f" (not logged to MLflow: {exc})"
    record = {
        "verdict": verdict, "summary": summary, "exit_code": outcome.exit_code, "weight": state.weight,
        "report": str(outcome.report_path) if outcome.report_path else None,
        "result": str(outcome.result_path) if outcome.result_path else None, "mlflow": mlflow_uri,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    with stack.store.locked():
        current = stack.store.load()
        stack.store.save(replace(current, last_gate=record))
    stack.store.history.append(
        "gate", f"{verdict} at {state.weight}% for {state.slots[state.candidate].bento}", summary
    )
    return outcome


def rollout(
    stack: LocalStack, steps: Sequence[int], options: GateOptions, say: Say, on_champion: Callable[[str], None]
) -> int:
    """Weight steps, each gated, then promote; returns the exit code (0 promoted, 1 rolled
    back on a failed or twice-inconclusive gate, 2 the gate itself could not run)."""
    from loadtest.gate import INCONCLUSIVE

    if not steps or any(not 0 < s <= 100 for s in steps) or list(steps) != sorted(set(steps)):
        raise CanaryError("--steps must be increasing percentages in 1-100, e.g. 5,25,50,100")
    if stack.store.load().candidate is None:
        raise CanaryError("rollout needs a candidate: run `canary deploy <version>` first")
    try:
        for step in steps:
            stack.execute(plan_weight(stack.store.load(), step, reason=f"rollout step {step}%"))
            say(f"== rollout: {step}% of traffic on the candidate; gating for {options.duration_s:g}s ==")
            inconclusive = 0
            while True:
                outcome = run_gate_on_stack(stack, options, label=f"step{step}")
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
                stack.execute(plan_rollback(stack.store.load(), reason=reason))
                say(f"rolled back to 0%: {reason}")
                return EXIT_HARNESS if outcome.exit_code == EXIT_HARNESS else EXIT_FAIL
        stack.execute(plan_promote(stack.store.load()), on_champion=on_champion)
        say("every step passed: the candidate is promoted (MLflow alias champion moved)")
        return EXIT_PASS
    except BaseException as exc:  # Ctrl-C or a crash: leave traffic at a safe, stated weight
        state = stack.store.load()
        if state.candidate is not None and state.weight > 0:
            why = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"crashed ({type(exc).__name__})"
            stack.execute(plan_rollback(state, reason=f"rollout {why} at {state.weight}%: traffic held at 0%"))
            say(f"rollout {why}: candidate traffic set to 0%; `canary status` shows it")
        raise
