"""Run the promotion gate from Python: `run_gate` starts real Locust (headless) as a
subprocess on `loadtest/gate_locustfile.py`, streams its progress and parses its result;
`log_to_mlflow` attaches the result, report and plots to the candidate's model version.

This module never imports Locust (which monkey-patches the process for gevent).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from loadtest.gate import DEFAULT_THRESHOLDS, GateVerdict
from loadtest.results import ERROR, EXIT_HARNESS, RESULT_FILE
from loadtest.targets import FORCE_TOKEN_ENV, Target

LOCUSTFILE = Path(__file__).with_name("gate_locustfile.py")
REPO_ROOT = LOCUSTFILE.parents[1]
LOCUST_LOG = "locust.log"  # everything Locust printed, in the gate's folder
GRACE_S = 120.0  # start-up (imports, probes) and report writing on top of the load itself


@dataclass(frozen=True)
class GateOutcome:
    """How a gate run ended.

    exit_code: 0 pass, 1 fail or inconclusive, 2 the gate could not run.
    verdict: the decision with its checks; None when the gate could not run.
    result_path / report_path: result.json and report.md (None when not written).
    plots: the PNG files the report embeds. error: why the gate could not run, if it could not.
    """

    exit_code: int
    verdict: GateVerdict | None
    result_path: Path | None
    report_path: Path | None
    plots: tuple[Path, ...] = ()
    error: str | None = None

    @property
    def result(self) -> dict[str, Any]:
        """The parsed result.json ({} when none was written)."""
        if self.result_path is None or not self.result_path.is_file():
            return {}
        return json.loads(self.result_path.read_text())


def _harness_error(message: str, result_path: Path | None = None) -> GateOutcome:
    return GateOutcome(EXIT_HARNESS, None, result_path, None, (), message)


def locust_command(
    stable: Target, candidate: Target, duration_s: float, users: int, spawn_rate: float, out_dir: Path,
    thresholds_path: Path, protocols: str | None = None, user_rate: float = 5.0, timeout_s: float = 10.0,
) -> list[str]:  # fmt: skip
    """The Locust command line of one gate run. It has no force token on purpose: a command
    line is readable by every user of the machine (`ps`); `run_gate` passes the token in
    the Locust process's environment."""
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"]
    argv += ["-u", str(users), "-r", f"{spawn_rate:g}", "-t", f"{math.ceil(duration_s)}s"]
    argv += [*stable.to_args("stable"), *candidate.to_args("candidate")]
    argv += ["--gate-out", str(out_dir), "--gate-thresholds", str(thresholds_path)]
    argv += ["--gate-user-rate", f"{user_rate:g}", "--gate-timeout", f"{timeout_s:g}"]
    return argv + (["--gate-protocols", protocols] if protocols else [])


def run_gate(
    stable: Target,
    candidate: Target,
    duration_s: float = 30.0,
    users: int = 16,
    spawn_rate: float = 16.0,
    out_dir: Path | str = "gate-out",
    thresholds_path: Path | str = DEFAULT_THRESHOLDS,
    *,
    protocols: str | None = None,
    user_rate: float = 5.0,
    timeout_s: float = 10.0,
    force_token: str | None = None,
    stream: TextIO | None = None,
) -> GateOutcome:
    """Load `stable` and `candidate` side by side for `duration_s` and decide.

    The gate's progress lines go to `stream` (default stdout); everything Locust printed
    goes to `locust.log` in `out_dir`. Never raises for
    a gate problem: bad arguments, an unreachable target or a crashed harness come back as
    exit code 2 with `error` set. `protocols` is the mix, e.g. "rest-json=2,grpc=1"
    (default: REST JSON, REST binary and, when both targets have an address, gRPC).
    `user_rate` is the digits per second each user sends to both slots (0 = flat out).
    `timeout_s` is the per-request timeout: a dead or frozen candidate ends the run at most
    about this long after `duration_s`, with exit code 1. Each target's `slot` and
    `model_version`, when set, must be who answers its requests.
    `force_token` goes out as `X-Canary-Force-Token` (gRPC metadata `x-canary-force-token`)
    with every request to both targets; it reaches Locust through the environment variable
    CANARY_GATE_FORCE_TOKEN, never its command line, and is written nowhere. None: no token
    (one in this process's environment is not passed on either).
    """
    stream = stream or sys.stdout
    if not (duration_s > 0 and users >= 1 and spawn_rate > 0 and timeout_s > 0):
        got = f"duration {duration_s}, users {users}, spawn rate {spawn_rate}, timeout {timeout_s}"
        return _harness_error(f"need duration > 0, users >= 1, spawn rate > 0 and timeout > 0 (got {got})")
    if force_token is not None and not (force_token.strip() and force_token.isprintable()):
        return _harness_error("the force token must be a non-empty line of printable characters")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    result_path = out_dir / RESULT_FILE
    result_path.unlink(missing_ok=True)  # a stale result must never pass for this run's
    argv = locust_command(
        stable, candidate, duration_s, users, spawn_rate, out_dir, Path(thresholds_path), protocols, user_rate,
        timeout_s,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop(FORCE_TOKEN_ENV, None)  # only the token of this call, if any
    if force_token is not None:
        env[FORCE_TOKEN_ENV] = force_token.strip()
    # The load, then up to a timeout for the requests in flight and the after-load check.
    deadline_s = duration_s + 2 * timeout_s + GRACE_S
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, cwd=REPO_ROOT, env=env,
        start_new_session=True,  # its own process group: a timeout or Ctrl-C here kills all of it
        preexec_fn=_die_with_parent,  # noqa: PLW1509  # nosec B603 - no shell; fixed argv
    )  # fmt: skip
    log_path = out_dir / LOCUST_LOG
    pump = threading.Thread(
        target=_copy_lines, args=(process.stdout, stream, log_path), name="gate-output", daemon=True
    )
    pump.start()
    try:
        code = process.wait(deadline_s)
    except subprocess.TimeoutExpired:
        _kill(process)
        return _harness_error(f"Locust did not finish within {deadline_s:.0f} s")
    except BaseException:  # Ctrl-C: no half-measured verdict, and no orphaned Locust
        _kill(process)
        raise
    finally:
        pump.join(10)
    return parse_outcome(code, result_path)


def parse_outcome(code: int, result_path: Path) -> GateOutcome:
    """Trust an exit code only together with a result.json that states the same code: Locust
    exits 1 on its own (e.g. a locustfile that fails to import), which must not read as "fail"."""
    if not result_path.is_file():
        return _harness_error(f"Locust exited with {code} without writing {result_path.name}")
    result = json.loads(result_path.read_text())
    if result.get("verdict") == ERROR or code == EXIT_HARNESS:
        return _harness_error(result.get("error") or f"Locust exited with {code}", result_path)
    if result.get("exit_code") != code:
        return _harness_error(f"Locust exited with {code} but the result says {result.get('exit_code')}", result_path)
    report = Path(result["report"]) if result.get("report") else None
    plots = tuple(Path(p) for p in result["plots"])
    return GateOutcome(code, GateVerdict.from_dict(result), result_path, report, plots)


def is_progress(line: str) -> bool:
    """The lines a person watching the gate needs: its progress, its problems, its files.
    Locust's own INFO lines and stats tables stay in the gate's locust.log."""
    return line.startswith("gate ") or "canary.gate:" in line or "Traceback" in line


def _copy_lines(source: TextIO, stream: TextIO, log_path: Path) -> None:
    with open(log_path, "w") as log:
        for line in source:
            log.write(line)
            log.flush()
            if is_progress(line):
                stream.write(line)
                stream.flush()


def _die_with_parent() -> None:
    """In the Locust child, before exec: SIGTERM it when `canary` dies, even by SIGKILL
    (its own session keeps it out of Ctrl-C's reach; a gate outliving its caller would go on
    forcing load onto the slots). Linux only; elsewhere a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def log_to_mlflow(outcome: GateOutcome, registered_name: str, version: int | str, client: Any = None) -> str:
    """Attach a gate run to a model version, so "why was this promoted" is answered in MLflow.

    Logs result.json, report.md and the plots as artifacts of the version's run under
    `gate/<UTC timestamp>-<verdict>/`, and sets model version tags `gate.verdict`,
    `gate.summary`, `gate.exit_code`, `gate.report` (artifact URI) and key figures
    (`gate.<slot>_p95_ms`, `gate.<slot>_error_ratio`, `gate.<slot>_accuracy`).
    Returns the artifact URI of the gate's folder. `client` defaults to an `MlflowClient`
    on the current tracking URI.
    """
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    model_version = client.get_model_version(registered_name, str(version))
    verdict = outcome.verdict.verdict if outcome.verdict else ERROR
    folder = f"gate/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{verdict}"
    files = [p for p in (outcome.result_path, outcome.report_path, *outcome.plots) if p is not None and p.is_file()]
    for path in files:
        client.log_artifact(model_version.run_id, str(path), artifact_path=folder)
    uri = f"runs:/{model_version.run_id}/{folder}"
    summary = outcome.verdict.summary if outcome.verdict else f"{ERROR}: {outcome.error}"
    tags = {"gate.verdict": verdict, "gate.summary": summary[:4900], "gate.exit_code": str(outcome.exit_code)}
    if outcome.report_path is not None:
        tags["gate.report"] = f"{uri}/{outcome.report_path.name}"
    for slot, figures in outcome.result.get("slots", {}).items():
        for key in ("p95_ms", "error_ratio", "accuracy"):
            if figures.get(key) is not None:
                tags[f"gate.{slot}_{key}"] = f"{figures[key]:.6g}"
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, str(version), key, value)
    return uri
