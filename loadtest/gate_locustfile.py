"""Locustfile of the promotion gate: loads stable and candidate side by side, then decides.

    locust -f loadtest/gate_locustfile.py --headless -u 16 -r 16 -t 30s \\
        --stable-rest http://127.0.0.1:8080 --stable-header "X-Canary: never" \\
        --candidate-rest http://127.0.0.1:8080 --candidate-header "X-Canary: always" \\
        --stable-grpc 127.0.0.1:50051 --candidate-grpc 127.0.0.1:50051 --gate-out gate-out/ \\
        --stable-slot blue --stable-version 2 --candidate-slot green --candidate-version 3 \\
        --gate-force-token-file ~/.canary/force-token

Who answered is checked, not assumed: with `--<slot>-slot NAME` an answer must carry
`X-Canary-Slot: NAME` (gRPC: `x-canary-slot` initial metadata), with `--<slot>-version V`
its V2 `model_version` must be V; any other answer is a failed request of that target.
When the router wants a token for forced requests, give it in the environment variable
CANARY_GATE_FORCE_TOKEN (what `run_gate` does) or as a file with `--gate-force-token-file`,
never as a header option: command lines are visible to every user of the machine (ps). It
goes out as `X-Canary-Force-Token` (gRPC: `x-canary-force-token`) with every request.

A request still unanswered when the load stops counts: the users get up to the request
timeout to finish (Locust's stop timeout), what is still open then and older than the hang
threshold (`loadtest.samples.hang_after_s`) is a failure "no answer after N s", and once
the load stops each slot must answer one more request per protocol; a slot that died in
the run's last moment fails there. So a dead or frozen candidate never passes, and the run
ends about a request timeout after its duration at the latest.

Exit codes (`environment.process_exit_code`): 0 pass, 1 fail or inconclusive, 2 the gate
itself could not run (bad arguments or thresholds, a target unreachable at start, an
exception in the harness, an interrupted run). Writes result.json, latency/timeline PNGs and report.md into
--gate-out and prints their paths.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gevent
import grpc
import locust.log
from locust import constant_throughput, events

from loadtest.gate import DEFAULT_THRESHOLDS, GateThresholds
from loadtest.results import EXIT_HARNESS, RESULT_FILE, RunConfig, finish_gate, write_error
from loadtest.samples import DigitFeed, SampleBook, hang_after_s
from loadtest.targets import FORCE_TOKEN_ENV, ROLES, Target, from_args
from loadtest.users import NO_PROXY, USER_CLASSES, GateContext, answers_now, bind

# Locust runs the User classes it finds in this module's namespace.
RestJsonUser, RestBinaryUser, GrpcUser = (USER_CLASSES[p] for p in ("rest-json", "rest-binary", "grpc"))

log = logging.getLogger("canary.gate")
DEFAULT_PROTOCOLS = "rest-json=1,rest-binary=1,grpc=1"
PROBE_TIMEOUT_S = 5.0
# Paced users, not a flat-out closed loop: flat out, the load generator and the two slots
# fight for the cores and latency becomes a measure of the scheduler. 16 users x 5 digits/s
# is 80 requests/s per slot, thousands of samples in 30 s.
DEFAULT_USER_RATE = 5.0


class GateSetupError(Exception):
    """The gate cannot run: exit code 2, never a verdict."""


@events.init_command_line_parser.add_listener
def add_arguments(parser) -> None:
    group = parser.add_argument_group("canary gate", "the two targets and where the verdict goes")
    for slot in ROLES:
        group.add_argument(f"--{slot}-rest", help=f"V2 REST base URL of the {slot} target")
        group.add_argument(f"--{slot}-grpc", default=None, help=f"V2 gRPC host:port of the {slot} target (optional)")
        group.add_argument(
            f"--{slot}-header", action="append", default=[], help=f"'Name: value' sent to {slot} (repeatable)"
        )
        group.add_argument(f"--{slot}-slot", default=None, help=f"router slot that must answer {slot} (X-Canary-Slot)")
        group.add_argument(f"--{slot}-version", default=None, help=f"model version that must answer {slot}")
    group.add_argument(
        "--gate-force-token-file",
        default=None,
        help=f"file holding the router's force token (default: ${FORCE_TOKEN_ENV}); never pass it as an option",
    )
    group.add_argument("--gate-thresholds", default=str(DEFAULT_THRESHOLDS), help="thresholds YAML file")
    group.add_argument("--gate-out", default="gate-out", help="directory for result.json, plots and report.md")
    group.add_argument(
        "--gate-protocols",
        default=None,
        help=f"protocol mix (default {DEFAULT_PROTOCOLS}, gRPC if both targets have it)",
    )
    group.add_argument("--gate-model", default="digits", help="V2 model name")
    group.add_argument("--gate-timeout", type=float, default=10.0, help="per-request timeout in seconds")
    group.add_argument(
        "--gate-user-rate",
        type=float,
        default=DEFAULT_USER_RATE,
        help=f"digits per second each user sends to both slots (default {DEFAULT_USER_RATE:g}; 0 = flat out)",
    )


def parse_protocols(text: str | None, targets: dict[str, Target]) -> dict[str, int]:
    """'rest-json=2,grpc=1' -> weights; the default leaves gRPC out when a target has none."""
    has_grpc = all(t.grpc for t in targets.values())
    if text is None:
        text = DEFAULT_PROTOCOLS if has_grpc else "rest-json=1,rest-binary=1"
    weights: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        if name not in USER_CLASSES:
            raise GateSetupError(f"unknown protocol {name!r} in --gate-protocols; choose from {sorted(USER_CLASSES)}")
        if weight and not weight.isdigit():
            raise GateSetupError(f"weight of {name} must be a whole number, got {weight!r}")
        weights[name] = int(weight or 1)
    if not any(weights.values()):
        raise GateSetupError("--gate-protocols selects no protocol")
    if weights.get("grpc") and not has_grpc:
        raise GateSetupError("gRPC is in the protocol mix but a target has no --*-grpc address")
    return weights


def read_force_token(token_file: str | None) -> str | None:
    """The force token from `--gate-force-token-file`, else from the environment; the
    token's value never goes into an error message."""
    if token_file:
        try:
            token = Path(token_file).expanduser().read_text().strip()
        except OSError as exc:
            raise GateSetupError(f"cannot read --gate-force-token-file {token_file}: {exc.strerror}") from None
    else:
        token = os.environ.get(FORCE_TOKEN_ENV, "").strip()
    if token and not token.isprintable():
        raise GateSetupError("the force token must be a single line of printable characters")
    return token or None


def probe(slot: str, context: GateContext, uses_grpc: bool) -> None:
    """Fail fast when nothing answers; any HTTP answer (even 503) counts as reachable:
    a candidate that answers badly must fail the gate, not abort it."""
    target = context.target(slot)
    # `Target` admits http(s) base URLs only, so the opener cannot be pointed at a file.
    request = urllib.request.Request(f"{target.rest}/v2/health/live", headers=context.headers(slot))  # noqa: S310
    try:
        NO_PROXY.open(request, timeout=PROBE_TIMEOUT_S).close()  # nosec B310
    except urllib.error.HTTPError:
        pass
    except (OSError, ValueError) as exc:
        raise GateSetupError(f"{slot} target {target.rest} is unreachable: {exc}") from None
    if uses_grpc:
        with grpc.insecure_channel(target.grpc) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=PROBE_TIMEOUT_S)
            except grpc.FutureTimeoutError:
                raise GateSetupError(f"{slot} gRPC target {target.grpc} is unreachable") from None


class AfterLoadCheck:
    """Once the load stops, one request per protocol to each slot, alongside the users' last
    requests: a slot that died in the run's last moment has nothing else to show it."""

    def __init__(self, context: GateContext, protocols: tuple[str, ...]) -> None:
        self.context, self.protocols = context, protocols
        self.calls: dict[tuple[str, str], gevent.Greenlet] = {}

    def start(self, **_kwargs) -> None:
        _, row, _ = self.context.feed.next()
        self.calls = {
            (slot, protocol): gevent.spawn(answers_now, self.context, slot, protocol, row)
            for slot in ROLES
            for protocol in self.protocols
        }

    def finish(self) -> dict[str, str | None]:
        """Per slot None (answered right) or why not; waits at most the request timeout."""
        timeout_s = self.context.timeout_s
        gevent.joinall(list(self.calls.values()), timeout=timeout_s + 1.0)
        # A check that never ran must not pass for one that did.
        errors: dict[str, str | None] = {slot: None if self.calls else "not checked" for slot in ROLES}
        for (slot, protocol), call in self.calls.items():
            if not call.ready():
                call.kill(block=False)
                error = f"{protocol}: no answer after {timeout_s:g} s"
            elif call.exception is not None:
                error = f"{protocol}: {type(call.exception).__name__}: {call.exception}"
            else:
                error = call.value
            errors[slot] = errors[slot] or error
        return errors


class NoAnswer(Exception):
    """A request still open when the load stopped (reported to Locust's statistics)."""


@dataclass(frozen=True)
class GateRun:
    """Everything the quitting handler needs to decide."""

    context: GateContext
    thresholds: GateThresholds
    config: RunConfig
    out_dir: Path
    after_load: AfterLoadCheck

    def on_test_stop(self, environment, **_kwargs) -> None:
        """Settle the requests the stop left open, then collect the after-load answers."""
        book = self.context.book
        hung = book.stop()
        for sample in hung:  # the book has them; this puts them in Locust's printed table too
            request_type = "grpc" if sample.protocol == "grpc" else "POST"
            context = {"slot": sample.slot, "protocol": sample.protocol, "pair": sample.pair, "label": sample.label}
            environment.events.request.fire(
                request_type=request_type, name=f"{sample.slot} {sample.protocol}", response_time=sample.latency_ms,
                response_length=0, exception=NoAnswer(sample.error), context=context,
            )  # fmt: skip
        if hung:
            per_slot = Counter(s.slot for s in hung)
            log.warning("requests with no answer when the load stopped: %s", dict(per_slot))
        book.after_load.update(self.after_load.finish())
        for slot, error in book.after_load.items():
            if error:
                log.warning("%s gave no right answer after the load: %s", slot, error)


def set_up(environment) -> GateRun:
    options = environment.parsed_options
    try:
        targets = {
            s: from_args(*(getattr(options, f"{s}_{part}") for part in ("rest", "grpc", "header", "slot", "version")))
            for s in ROLES
        }
        thresholds = GateThresholds.from_yaml(options.gate_thresholds)
    except (ValueError, OSError) as exc:
        raise GateSetupError(str(exc)) from None
    weights = parse_protocols(options.gate_protocols, targets)
    if options.gate_user_rate < 0:
        raise GateSetupError("--gate-user-rate must be >= 0")
    if not options.gate_timeout > 0:
        raise GateSetupError("--gate-timeout must be > 0")
    force_token = read_force_token(options.gate_force_token_file)
    for name, user_class in USER_CLASSES.items():
        user_class.weight = weights.get(name, 0)
        if options.gate_user_rate:
            user_class.wait_time = constant_throughput(options.gate_user_rate)
    environment.user_classes[:] = [u for u in environment.user_classes if u.weight > 0]
    book = SampleBook(hang_s=hang_after_s(options.gate_timeout, thresholds.slo_p95_ms))
    context = GateContext(
        targets["stable"], targets["candidate"], DigitFeed.test_split(), book, options.gate_model,
        options.gate_timeout, force_token,
    )  # fmt: skip
    for slot in ROLES:
        probe(slot, context, bool(weights.get("grpc")))
    # Let the users finish the requests in flight when the load stops instead of killing them
    # mid-flight: each ends within the request timeout, answered or failed. Whatever is still
    # open after that is settled by the book's hang rule.
    environment.stop_timeout = max(float(environment.stop_timeout or 0), options.gate_timeout + 1.0)
    mix = ",".join(f"{name}={weight}" for name, weight in weights.items() if weight)
    config = RunConfig(
        options.num_users or 1, options.spawn_rate, mix, options.gate_thresholds, options.gate_model,
        options.gate_timeout, book.hang_s, force_token is not None,
    )  # fmt: skip
    after_load = AfterLoadCheck(context, ("rest-json", "grpc") if weights.get("grpc") else ("rest-json",))
    run = GateRun(context, thresholds, config, Path(options.gate_out), after_load)
    environment.events.request.add_listener(book.on_request)
    environment.events.test_start.add_listener(lambda **_: book.start())
    environment.events.test_start.add_listener(lambda **_: gevent.spawn(report_progress, book, options.run_time))
    environment.events.test_stopping.add_listener(lambda **_: setattr(context, "stopping", True))
    environment.events.test_stopping.add_listener(after_load.start)
    environment.events.test_stop.add_listener(run.on_test_stop)
    return run


def progress_line(book: SampleBook, elapsed_s: float, run_time_s: float | None) -> str:
    """One line of the gate's live progress: elapsed/remaining, answers and failures per slot."""
    counts = {role: [0, 0] for role in ROLES}
    for sample in book.samples:
        counts[sample.slot][0 if sample.ok else 1] += 1
    left = f", {max(0.0, run_time_s - elapsed_s):.0f}s left" if run_time_s else ""
    slots = "  ".join(f"{role} {ok} answered {failed} failed" for role, (ok, failed) in counts.items())
    return f"gate progress: {elapsed_s:.0f}s{left}  {slots}"


def report_progress(book: SampleBook, run_time_s: float | None) -> None:
    """Print `progress_line` every few seconds while the load runs (a greenlet): every 5 s,
    more often in short runs so even those show some."""
    started, every_s = time.monotonic(), max(1.0, min(5.0, (run_time_s or 20.0) / 4))
    while book.stopped is None:
        gevent.sleep(every_s)
        if book.stopped is None:
            print(progress_line(book, time.monotonic() - started, run_time_s), flush=True)


@events.init.add_listener
def on_init(environment, **_kwargs) -> None:
    if environment.parsed_options is None:  # imported without the command line: nothing to set up
        return
    out_dir = Path(environment.parsed_options.gate_out)
    try:
        run = set_up(environment)
        bind(environment, run.context)
        environment.canary_gate_run = run
        # The set-up (the digits, the probes) blocked gevent's loop, whose clock stood still
        # meanwhile: Locust's --run-time timer, set next, would fire early by as long as it took.
        gevent.get_hub().loop.update_now()
    except Exception as exc:  # noqa: BLE001 - whatever stops the set-up is a harness error
        reason = str(exc) if isinstance(exc, GateSetupError) else f"{type(exc).__name__}: {exc}"
        path = write_error(out_dir, reason)
        log.error("gate cannot run: %s (%s)", reason, path)
        print(f"gate result: {path.resolve()}", flush=True)
        # Locust's event hook would log an exception and exit 1; SystemExit passes through it.
        sys.exit(EXIT_HARNESS)


@events.quitting.add_listener
def on_quitting(environment, **_kwargs) -> None:
    run: GateRun | None = getattr(environment, "canary_gate_run", None)
    if run is None:
        return
    out_dir, context = run.out_dir, run.context
    try:
        if context.book.stopped is None:  # Ctrl-C or SIGTERM: Locust quits before stopping the load
            raise RuntimeError("the run was interrupted before its end; no verdict on partial load")
        crashed = list(environment.runner.exceptions.values()) if environment.runner else []
        if crashed or locust.log.unhandled_greenlet_exception:
            first = crashed[0]["msg"] if crashed else "an event handler raised (see the log)"
            raise RuntimeError(f"the gate's users raised: {first}")
        targets = {"stable": context.stable, "candidate": context.candidate}
        verdict, result = finish_gate(context.book, targets, run.thresholds, run.config, out_dir)
        code = result["exit_code"]
        log.info("gate verdict: %s", verdict.summary)
        for label, path in (("report", result["report"]), *(("plot", p) for p in result["plots"])):
            print(f"gate {label}: {path}", flush=True)
    except Exception as exc:  # noqa: BLE001 - a broken harness must never look like a verdict
        log.exception("the gate harness failed")
        write_error(out_dir, f"{type(exc).__name__}: {exc}")
        code = EXIT_HARNESS
    print(f"gate result: {(out_dir / RESULT_FILE).resolve()}", flush=True)
    environment.process_exit_code = code
