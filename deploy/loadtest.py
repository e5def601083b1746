"""`canary loadtest`: Locust (`loadtest/locustfile.py`) against the running stack.

`plan_load` turns the options, the stack's settings and its release state into a
`LoadPlan`: the Locust command lines, the environment they need (the force token travels
there, never on a command line) and the report folder (`<state folder>/loadtest/<time>-<pid>/`).
`run_load` runs it: Locust's web UI until Ctrl-C, or a headless run that writes its CSV,
HTML and JSON reports into the folder. With `workers` it runs Locust's own distributed mode
on this machine: a master plus N worker processes, each started with its pid recorded
(psutil, so a recycled pid is never signalled) and stopped by that pid, whatever happens.

Traffic goes through nginx as clients send it (both slots, at the router's weights), or
with `slot` to one slot only: forced through nginx (`X-Canary: never` for the stable slot,
`always` for the candidate, with the stack's force token), every answer checked to come
from that slot and its model version.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from deploy.process import free_port
from deploy.stack import LocalStack
from deploy.state import SLOTS
from loadtest.shapes import SHAPE_ENV, SHAPES, percentile
from loadtest.targets import FORCE_TOKEN_ENV
from models.errors import CanaryError
from models.home import REPO_ROOT

LOCUSTFILE = REPO_ROOT / "loadtest" / "locustfile.py"
MAX_WORKERS = 64
STOP_TIMEOUT_S = 30.0  # Locust writes its reports on SIGTERM: give it time
FINAL_REPORTS_WAIT_S = 5.0  # > Locust's worker report interval (3 s)
ORPHAN_GRACE_S = 20.0  # a master whose workers all left gets this long to finish by itself
Say = Callable[[str], None]


@dataclass(frozen=True)
class LoadOptions:
    """What `canary loadtest` was asked for.

    slot: load only this slot (blue or green), forced through nginx; None: nginx as clients see it.
    workers: 0 runs the users in one Locust process; N runs a master and N local workers.
    shape: step, spike, soak or knee (`loadtest/shapes.py`); it replaces users/duration.
    headless: no web UI; the run lasts `duration_s` (or the shape) and writes reports.
    users, spawn_rate: Locust's -u and -r (the web UI's starting values when not headless).
    user_rate: requests per second per user (0 = flat out); None: the locustfile's default.
    weights: the protocol mix, e.g. "rest-json=3,grpc=1"; None: all four protocols alike.
    """

    slot: str | None = None
    workers: int = 0
    shape: str | None = None
    headless: bool = False
    users: int = 32
    spawn_rate: float = 32.0
    duration_s: float = 60.0
    user_rate: float | None = None
    weights: str | None = None
    web_port: int = 8089

    def check(self) -> None:
        """Refuse bad options in one line, before anything looks at the stack."""
        if self.slot is not None and self.slot not in SLOTS:
            raise CanaryError(f"--slot must be {' or '.join(SLOTS)}, got {self.slot!r}")
        if self.shape is not None and self.shape not in SHAPES:
            raise CanaryError(f"--shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        if not 0 <= self.workers <= MAX_WORKERS:
            raise CanaryError(f"--workers must be between 0 and {MAX_WORKERS}, got {self.workers}")
        if self.users < 1 or not self.spawn_rate > 0 or not self.duration_s > 0:
            raise CanaryError("--users must be at least 1, --spawn-rate and --duration above 0")
        if self.user_rate is not None and self.user_rate < 0:
            raise CanaryError(f"--user-rate must be 0 (flat out) or more, got {self.user_rate:g}")
        if not 1 <= self.web_port <= 65535:
            raise CanaryError(f"--web-port must be a TCP port, got {self.web_port}")


@dataclass(frozen=True)
class LoadPlan:
    """The Locust processes of one `canary loadtest`."""

    command: list[str]  # the one Locust process, or the master
    workers: list[list[str]]
    report_dir: Path
    env: dict[str, str] = field(default_factory=dict, repr=False)  # holds the force token: never printed
    web_url: str | None = None
    target: str = ""  # what is loaded, for the user


def _client_host(host: str) -> str:
    """Where this machine reaches a listener bound to `host` (every interface: loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _require_free(host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            raise CanaryError(f"port {port} ({what}) is already taken; pick another with --web-port") from None


def plan_load(stack: LocalStack, options: LoadOptions, stamp: str | None = None) -> LoadPlan:
    """The Locust command lines for `options` against `stack` (which must be up)."""
    options.check()
    if not stack.nginx().running():
        raise CanaryError("the stack is not running: run `canary up` first")
    s, state = stack.settings, stack.store.load()
    host = _client_host(s.nginx_public_host)
    rest, grpc = f"http://{host}:{s.nginx_rest_port}", f"{host}:{s.nginx_grpc_port}"
    # the process id too: two runs started in the same second never share a folder
    report_dir = stack.home.home / "loadtest" / (stamp or f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", rest, "--grpc-host", grpc]
    argv += ["-u", str(options.users), "-r", f"{options.spawn_rate:g}"]
    env: dict[str, str] = {}
    target = f"nginx {rest} (gRPC {grpc}), both slots at the router's weights"
    if options.slot is not None:
        roles = {state.stable: "never", state.candidate: "always"}
        force = roles.get(options.slot)
        if force is None or not state.slots[options.slot].bento:
            raise CanaryError(
                f"slot {options.slot} serves no traffic (stable {state.stable}, candidate {state.candidate or 'none'})"
            )
        version = state.slots[options.slot].model_version or ""
        argv += ["--force", force, "--expect-slot", options.slot] + (["--expect-version", version] if version else [])
        env[FORCE_TOKEN_ENV] = stack.force_token()
        target = f"slot {options.slot} (model version {version or '?'}) through nginx {rest}, forced"
    if options.user_rate is not None:
        argv += ["--user-rate", f"{options.user_rate:g}"]
    if options.weights is not None:
        argv += ["--weights", options.weights]
    if options.shape is not None:
        env[SHAPE_ENV] = options.shape
        if options.shape == "knee":
            argv += ["--knee-out", str(report_dir / "knee.json")]
    web_url = None
    if options.headless:
        if options.workers:
            # Not --headless: a headless master quits half a second after telling its workers
            # to, and on a busy machine their last statistics (up to 3 s of the run) arrive
            # later and are lost. With --autostart the master stops the workers' users first,
            # waits --autoquit seconds for their last reports, then quits. Its web UI listens
            # on loopback meanwhile.
            argv += ["--autostart", "--autoquit", f"{FINAL_REPORTS_WAIT_S:g}"]
            argv += ["--web-host", "127.0.0.1", "--web-port", str(free_port())]
        else:
            argv += ["--headless"]
        argv += ["--only-summary", "--csv", str(report_dir / "locust"), "--html", str(report_dir / "report.html")]
        argv += ["--json-file", str(report_dir / "stats")]  # Locust adds .json
        if options.shape is None:
            argv += ["-t", f"{options.duration_s:g}s"]
    else:
        _require_free("127.0.0.1", options.web_port, "Locust web UI")
        argv += ["--web-host", "127.0.0.1", "--web-port", str(options.web_port)]
        web_url = f"http://127.0.0.1:{options.web_port}"
    workers: list[list[str]] = []
    if options.workers:
        port = free_port()
        argv += ["--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port)]
        argv += ["--expect-workers", str(options.workers)]
        worker = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--worker", "--master-host", "127.0.0.1"]
        workers = [[*worker, "--master-port", str(port)] for _ in range(options.workers)]
    return LoadPlan(argv, workers, report_dir, env, web_url, target)


class Workers:
    """Locust worker processes, each tracked by its pid and start time (psutil)."""

    def __init__(self, report_dir: Path, env: dict[str, str]) -> None:
        self.report_dir, self.env = report_dir, env
        self.processes: list[psutil.Popen] = []

    def start(self, argv: list[str]) -> psutil.Popen:
        index = len(self.processes)
        with open(self.report_dir / f"worker-{index}.log", "wb") as log:
            process = psutil.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=self.env, start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - fixed argv, no shell
            )  # fmt: skip
        self.processes.append(process)
        return process

    def died(self) -> list[int]:
        """Indexes of the workers that exited (at the end of a run they leave with their master)."""
        return [i for i, p in enumerate(self.processes) if p.poll() is not None]

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM each worker still running (by its pid, checked against its start time),
        SIGKILL the ones that linger."""
        running = [p for p in self.processes if p.poll() is None and p.is_running()]
        for process in running:
            process.terminate()
        _, alive = psutil.wait_procs(running, timeout=timeout_s)
        for process in alive:
            process.kill()
        psutil.wait_procs(alive, timeout=5)


def run_load(plan: LoadPlan, say: Say) -> int:
    """Run the plan in the foreground; returns Locust's exit code (0: no failed request)."""
    plan.report_dir.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {key: value for key, value in os.environ.items() if key not in (FORCE_TOKEN_ENV, SHAPE_ENV)}
    env = {**env, "PYTHONPATH": path, **plan.env}
    say(f"loading {plan.target}")
    if plan.web_url:
        say(f"Locust web UI: {plan.web_url}  (Ctrl-C stops it)")
    workers = Workers(plan.report_dir, env)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM stops it like Ctrl-C
    master = subprocess.Popen(
        plan.command, cwd=REPO_ROOT, env=env, start_new_session=True,  # Ctrl-C is ours: we stop it with SIGTERM
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - fixed argv, no shell
    )  # fmt: skip
    try:
        for argv in plan.workers:
            workers.start(argv)
        if plan.workers:
            pids = ", ".join(str(p.pid) for p in workers.processes)
            say(f"Locust master + {len(plan.workers)} workers (pids {pids}; logs in {plan.report_dir})")
        orphaned_since: float | None = None
        while master.poll() is None:
            # Locust's master copes with a worker that leaves; with none left it may wait for
            # them forever (a headless master expecting workers that failed to start).
            if plan.workers and len(workers.died()) == len(plan.workers):
                orphaned_since = orphaned_since or time.monotonic()
                if time.monotonic() - orphaned_since > ORPHAN_GRACE_S:
                    say(f"error: every Locust worker exited; see {plan.report_dir / 'worker-0.log'}")
                    _stop(master)
                    return 1
            time.sleep(0.2)
        code = master.returncode
    except KeyboardInterrupt:
        say("stopping Locust")
        _stop(master)
        code = master.returncode
    finally:
        workers.stop()
        signal.signal(signal.SIGTERM, previous)
    if plan.web_url is None:
        stats = plan.report_dir / "stats.json"
        if stats.is_file():
            for line in summary_lines(json.loads(stats.read_text())):
                say(line)
        say(f"reports: {plan.report_dir}")
    return code


def summary_lines(entries: list[dict]) -> list[str]:
    """Locust's final statistics (its --json-file entries) as a short table: requests,
    failures, requests/s while the load ran, and latency percentiles per request name."""
    if not entries:
        return ["no requests"]

    def row(name: str, group: list[dict]) -> str:
        requests, failures = sum(e["num_requests"] for e in group), sum(e["num_failures"] for e in group)
        seconds = max(e["last_request_timestamp"] for e in group) - min(e["start_time"] for e in group)
        histogram: dict[int, int] = {}
        for entry in group:
            for ms, n in entry["response_times"].items():
                histogram[int(float(ms))] = histogram.get(int(float(ms)), 0) + n
        p50, p95, p99 = (percentile(histogram, share) for share in (0.5, 0.95, 0.99))
        rate = requests / seconds if seconds > 0 else 0.0
        return (f"{name:<24} {requests:>9} {failures:>9} {rate:>8.1f} "
                f"{p50 or 0:>6.0f} {p95 or 0:>6.0f} {p99 or 0:>6.0f}")  # fmt: skip

    head = f"{'request':<24} {'requests':>9} {'failures':>9} {'req/s':>8} {'p50':>6} {'p95':>6} {'p99 ms':>6}"
    named = [row(e["name"], [e]) for e in sorted(entries, key=lambda e: e["name"])]
    return [head, *named, row("all", entries)]


def run_loadtest(stack: LocalStack, options: LoadOptions, say: Say) -> int:
    """`canary loadtest`: plan against the stack, then run."""
    return run_load(plan_load(stack, options), say)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM (Locust writes its reports, then exits), SIGKILL if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _die_with_parent() -> None:
    """In a Locust child, before exec: SIGTERM it when `canary` dies, even by SIGKILL (its
    own session keeps it out of Ctrl-C's reach). Linux only; elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
