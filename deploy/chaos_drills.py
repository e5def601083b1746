"""The drills of `make chaos` (see `deploy.chaos`), each on the chaos stack under load.

Load is real Locust (`loadtest/locustfile.py`'s V2 REST JSON user: distinct digits, cache
off, no retries, each request named after the slot that answered) in a subprocess of its own session, stopped
with SIGTERM. nginx's per-slot counters say where traffic went. Faults hit only processes
this run started, by the pids the stack recorded: a slot's whole process tree, our Redis,
our nginx, our `canary` subprocess. Before each drill the stack is reset: every process up,
a live candidate at 0% (redeployed when a drill killed it), no slot marked down.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import httpx

from deploy.chaos import (
    DrillResult,
    LoadStats,
    Release,
    Say,
    count,
    one_line,
    read_locust_json,
    share_percent,
    split_matches,
    stack_env,
)
from deploy.process import descendants, kill_tree, venv_bin
from deploy.release import plan_deploy, plan_weight
from deploy.rollout import GateOptions, run_gate_on_stack
from deploy.stack import LocalStack, StackSettings
from loadtest.run_gate import GateOutcome
from models.errors import CanaryError
from models.home import REPO_ROOT, CanaryHome

LOCUSTFILE = REPO_ROOT / "loadtest" / "locustfile.py"
LOAD_USERS = 8
GATE = GateOptions(duration_s=12, users=16, spawn_rate=16)
WEIGHT = 30
CLIENT_TIMEOUT_MARGIN_S = 5.0  # the drills' clients wait nginx's upstream timeout plus this
FREEZE_S = 25.0  # SIGSTOP at 30%: long enough for nginx's timeouts to take the slot out


class Finding(NamedTuple):
    """What one drill found: client requests sent and failed, the outcome, the verdict."""

    sent: int | None
    failed: int | None
    outcome: str
    ok: bool


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Load:
    """Headless Locust on the chaos stack's public REST listener until `stop()`."""

    def __init__(self, settings: StackSettings, folder: Path, users: int = LOAD_USERS) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._log = open(folder / "locust.log", "w")  # noqa: SIM115 - closed by stop()
        host = f"http://{settings.host}:{settings.nginx_rest_port}"
        argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users),
                "-r", str(users), "-t", "900s", "--host", host, "--only-summary", "--stop-timeout", "5",
                # longer than nginx's wait for a slot, so a request nginx retries on the other
                # slot after a frozen one timed out is answered, not timed out by Locust first
                "--request-timeout", f"{settings.upstream_timeout_s + CLIENT_TIMEOUT_MARGIN_S:g}",
                "--csv", str(folder / "run"),  # the failures' reasons
                "--json-file", str(folder / "final"),  # the final counts, written at exit
                "V2RestJsonUser"]  # fmt: skip  # V2 REST JSON only
        # its own session: a Ctrl-C of ours must not reach it (we stop it, with SIGTERM)
        self.process = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True
        )
        self._stats: LoadStats | None = None

    def stop(self) -> LoadStats:
        """SIGTERM (Locust writes its statistics, then exits), then read them. Idempotent."""
        if self._stats is not None:
            return self._stats
        if self.process.poll() is None:
            # not SIGINT: it becomes a KeyboardInterrupt in whichever greenlet runs and a
            # user greenlet may swallow it (see tests/deploy/test_stack.py `Load`)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        final = self.folder / "final.json"  # Locust appends .json to --json-file
        if not final.exists():
            raise CanaryError(f"Locust wrote no final statistics; see {self.folder / 'locust.log'}")
        self._stats = read_locust_json(final, self.folder / "run_failures.csv")
        return self._stats


class Drills:
    def __init__(self, home: CanaryHome, settings: StackSettings, stable: Release, candidate: Release, say: Say):
        self.home, self.settings, self.say = home, settings, say
        self.stable_release, self.candidate_release = stable, candidate
        self.stack = LocalStack(home, settings)
        self.folder = self.stack.folder / "runs" / time.strftime("%Y%m%dT%H%M%S")
        self.stable, self.cand = "blue", "green"  # set by reset() from the release state
        self._loads: list[Load] = []
        self._stopped: set[int] = set()  # pids we SIGSTOPped and have not SIGCONTed yet

    # -- the stack ----------------------------------------------------------------------
    def start(self) -> None:
        if stopped := self.stack.down():  # a previous run that was itself killed
            self.say(f"stopped leftovers of an earlier chaos run: {', '.join(stopped)}")
        for name in ("state.json", "routing.json"):  # start from a known state; history stays
            (self.stack.folder / name).unlink(missing_ok=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        s = self.settings
        self.say(f"starting the chaos stack: nginx :{s.nginx_rest_port}, redis :{s.redis_port}, "
                 f"stable {self.stable_release.bento} in blue (logs {self.stack.logs})")  # fmt: skip
        self.stack.up(self.stable_release.pair())

    def stop(self) -> None:
        """Whatever happened: SIGCONT what we froze, stop Locust, stop the stack."""
        for pid in list(self._stopped):
            kill_tree(pid, signal.SIGCONT)
        for load in self._loads:
            with contextlib.suppress(Exception):
                load.stop()
        self.stack.down()

    def meta(self, seconds: float) -> list[str]:
        s = self.settings
        return [
            f"Run {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()} with {os.cpu_count()} cores, "
            f"{seconds / 60:.1f} minutes; stable {self.stable_release.bento} (model {self.stable_release.version}), "
            f"candidate {self.candidate_release.bento} (model {self.candidate_release.version}).",
            f"Load: Locust, {LOAD_USERS} users, distinct digits, response cache off, no client retries. "
            f"Gates: {GATE.duration_s:g} s, {GATE.users} users. nginx: upstream timeout {s.upstream_timeout_s:g} s, "
            f"a slot is out after {s.router_max_fails} transport failures for {s.router_fail_timeout_s} s.",
            f"Drill folders (Locust CSVs, logs): `{self.folder}`",
        ]

    def served(self) -> dict[str, int]:
        return {name: info["requests"] for name, info in self.router()["slots"].items()}

    def router(self) -> dict:
        """nginx's live routing and per-slot counters (admin API, with the stack's admin token)."""
        return self.stack.nginx().status(self.stack.token_file.read_text().strip())

    def shares(self, at_least: int = 400, settle_s: float = 0.5, timeout_s: float = 90.0) -> dict[str, int]:
        """Requests each slot answered over the next `at_least` (after `settle_s`)."""
        time.sleep(settle_s)
        start = self.served()
        deadline = time.monotonic() + timeout_s
        while sum((now := self.served()).values()) - sum(start.values()) < at_least:
            if time.monotonic() > deadline:
                raise CanaryError(f"the load stalled: fewer than {at_least} requests in {timeout_s:g}s")
            time.sleep(0.1)
        return {name: now[name] - start[name] for name in now}

    def load(self, name: str) -> Load:
        """Locust load, once its requests arrive (a load that never starts is stopped)."""
        load = Load(self.settings, self.folder / name)
        self._loads.append(load)
        try:
            self.shares(at_least=100, settle_s=0, timeout_s=60)
        except BaseException:
            with contextlib.suppress(CanaryError):
                load.stop()
            raise
        return load

    def reset(self) -> None:
        """Every process up, a live candidate at 0%, no slot marked down."""
        stack, state = self.stack, self.stack.store.load()
        if not stack.nginx().running() or not stack.process("redis").alive or stack.slot_problem(state.stable):
            self.say("restarting what is not running")
            state = stack.up(None)
        slot = state.candidate
        if slot is None or state.slots[slot].bento != self.candidate_release.bento or stack.slot_problem(slot):
            self.say(f"deploying a fresh candidate {self.candidate_release.bento} in slot {state.idle}")
            state = stack.execute(plan_deploy(state, *self.candidate_release.pair()))
        elif state.weight:
            state = stack.execute(plan_weight(state, 0, reason="chaos: reset"))
        self.cand, self.stable = state.candidate or "", state.stable
        deadline = time.monotonic() + self.settings.router_fail_timeout_s + 5
        while any(info["down"] for info in self.router()["slots"].values()) and time.monotonic() < deadline:
            time.sleep(0.5)  # a slot marked down by the last drill: wait until nginx lets it back

    def weight(self, percent: int) -> None:
        self.stack.execute(plan_weight(self.stack.store.load(), percent, reason="chaos drill"))

    def slot_pid(self, slot: str) -> int:
        info = self.stack.process(f"slot-{slot}")
        if not info.alive or info.pid is None:
            raise CanaryError(f"slot {slot}'s process is not running")
        return info.pid

    def hit(self, slot: str, sig: signal.Signals) -> str:
        """Signal a slot's whole process tree (BentoML's workers included)."""
        pid = self.slot_pid(slot)
        tree = [pid, *descendants(pid)]
        kill_tree(pid, sig)
        if sig == signal.SIGSTOP:
            self._stopped.add(pid)
        elif sig == signal.SIGCONT:
            self._stopped.discard(pid)
        return f"{sig.name} to slot {slot}'s {len(tree)} processes (pid {pid})"

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {**os.environ, **stack_env(self.settings)}
        return subprocess.run([venv_bin("canary"), *args], env=env, capture_output=True, text=True, timeout=timeout)

    def probe(self, n: int = 20) -> list[tuple[int, str]]:
        """`n` plain requests (no X-Canary): (status, X-Canary-Slot) of each."""
        url = f"http://{self.settings.host}:{self.settings.nginx_rest_port}/v2/models/digits/infer"
        answers = []
        with httpx.Client(timeout=30) as client:
            for i in range(n):
                row = [float((i * 7 + j) % 17) for j in range(64)]
                body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}],
                        "parameters": {"cache": False}}  # fmt: skip
                answer = client.post(url, json=body)
                answers.append((answer.status_code, answer.headers.get("x-canary-slot", "?")))
        return answers

    def stable_serves(self) -> bool:
        return all(a == (200, self.stable) for a in self.probe())

    # -- running ------------------------------------------------------------------------
    def catalogue(self) -> list[tuple[str, Callable[[], Finding]]]:
        return [
            ("candidate SIGKILLed mid-gate", lambda: fault_mid_gate(self, signal.SIGKILL)),
            (f"candidate SIGKILLed at {WEIGHT}%", lambda: kill_at_weight(self)),
            (f"candidate hangs (SIGSTOP) at {WEIGHT}%", lambda: freeze_at_weight(self)),
            ("candidate hangs (SIGSTOP) mid-gate", lambda: fault_mid_gate(self, signal.SIGSTOP)),
            ("stable overloaded at 0% (24 x 1024 rows)", lambda: overload_stable(self)),
            ("Redis killed and restarted", lambda: restart_redis(self)),
            ("nginx restarted (stop + start)", lambda: restart_nginx(self)),
            ("`canary rollout` SIGKILLed mid-gate", lambda: kill_canary_mid_rollout(self)),
            ("promote of a dead candidate", lambda: promote_dead_candidate(self)),
            ("stable flooded with 8 MiB bodies ending in NaN", lambda: flood_stable(self)),
        ]

    def run(self, results: list[DrillResult], only: str | None = None) -> None:
        """Each drill (or those whose name contains `only`) in turn, appended to `results` as
        it ends (a drill that breaks is a NOT OK row; Ctrl-C ends the run)."""
        drills = [(fault, drill) for fault, drill in self.catalogue() if only is None or only in fault]
        if not drills:
            raise CanaryError(f"no drill's name contains {only!r}")
        for number, (fault, drill) in enumerate(drills, 1):
            self.say(f"== drill {number}/{len(drills)}: {fault} ==")
            started = time.monotonic()
            try:
                self.reset()
                found = drill()
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - a broken drill is a finding, not a crash
                found = Finding(None, None, f"the drill broke: {one_line(exc)}", False)
            finally:
                for pid in list(self._stopped):  # never leave a slot frozen
                    kill_tree(pid, signal.SIGCONT)
                    self._stopped.discard(pid)
            result = DrillResult(fault, *found, seconds=time.monotonic() - started)
            results.append(result)
            self.say(f"   {result.verdict} ({result.seconds:.0f}s): {result.outcome}")

    def gate(self, label: str) -> GateOutcome:
        """`canary gate` in this process (its Locust output to a log file, not the screen)."""
        with open(self.folder / f"{label}-gate.log", "w") as handle, contextlib.redirect_stdout(handle):
            return run_gate_on_stack(self.stack, GATE, label=f"chaos-{label}")

    def post_many(self, body: dict, n: int) -> list[httpx.Response | str]:
        url = f"http://{self.settings.host}:{self.settings.nginx_rest_port}/v2/models/digits/infer"

        def one(_: int) -> httpx.Response | str:
            try:
                return httpx.post(url, json=body, timeout=60)
            except httpx.HTTPError as exc:
                return type(exc).__name__

        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(one, range(n)))

    def cache_events(self) -> dict[str, float]:
        """canary_cache_events by kind, summed over both slots' /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        totals: dict[str, float] = {}
        for slot in (self.stable, self.cand):
            with contextlib.suppress(httpx.HTTPError):
                text = httpx.get(f"{self.stack.slot_url(slot)}/metrics", timeout=5).text
                for family in text_string_to_metric_families(text):
                    if family.name != "canary_cache_events":
                        continue
                    for sample in family.samples:
                        if sample.name.endswith("_total"):
                            kind = sample.labels.get("kind", "?")
                            totals[kind] = totals.get(kind, 0.0) + sample.value
        return totals

    def describe_split(self, shares: dict[str, int]) -> str:
        return f"{self.cand} {share_percent(shares, self.cand):.0f}% of {count(sum(shares.values()))}"

    def routing_agrees(self) -> tuple[bool, str]:
        """State file, routing file and nginx's live routing say the same."""
        state, router = self.stack.store.load(), self.router()
        routing_file = json.loads(self.stack.routing_file.read_text())
        want = (state.stable, state.candidate, state.weight)
        seen = {"nginx": (router["stable"], router["candidate"], router["weight"]),
                "routing file": (routing_file["stable"], routing_file["candidate"], routing_file["weight"])}  # fmt: skip
        wrong = [f"{name} {got}" for name, got in seen.items() if got != want]
        return not wrong, (f"state {want} but " + ", ".join(wrong)) if wrong else f"{state.weight}%"

    def split_ok(self, shares: dict[str, int]) -> bool:
        return split_matches(shares, self.cand, self.stack.store.load().weight)


# -- the drills ----------------------------------------------------------------------------
def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = (done.stderr or "").strip().splitlines() or ["(nothing on stderr)"]
    return lines[-1].removeprefix("error: ")


def fault_mid_gate(d: Drills, sig: signal.Signals) -> Finding:
    """A gate of the candidate; a few seconds into its load, the candidate's whole process
    tree gets `sig` (SIGKILL: it dies; SIGSTOP: it hangs). The gate must not pass."""
    slot, start = d.cand, d.served()[d.cand]
    fired: dict[str, float] = {}
    done = threading.Event()

    def strike() -> None:
        deadline = time.monotonic() + 90
        while d.served()[slot] - start < 30:  # the gate's forced requests reach the candidate
            if done.is_set() or time.monotonic() > deadline:
                return
            time.sleep(0.2)
        if not done.wait(4.0):
            fired["at"] = time.monotonic()
            what = d.hit(slot, sig)
            d.say(f"{what}, 4 s into the gate's load")

    d.say(f"gating candidate {slot} ({GATE.duration_s:g}s, {GATE.users} users); {sig.name} comes mid-load")
    thread = threading.Thread(target=strike, name="chaos-strike", daemon=True)
    thread.start()
    try:
        outcome = d.gate(f"{sig.name.lower()}-mid-gate")
    finally:
        done.set()
        thread.join(15)
        if sig == signal.SIGSTOP and fired:
            d.say(d.hit(slot, signal.SIGCONT))
    ended = time.monotonic()
    slots = outcome.result.get("slots", {})
    sent = sum(s.get("requests", 0) for s in slots.values()) if slots else None
    failed = sum(s.get("failures", 0) for s in slots.values()) if slots else None
    verdict = outcome.verdict.verdict if outcome.verdict else "error"
    if not fired:
        return Finding(sent, failed, f"the {sig.name} never came: gate exit {outcome.exit_code} ({verdict})", False)
    cand = slots.get("candidate")
    detail = (f"{count(cand.get('failures'))} of the candidate's {count(cand.get('requests'))} gate requests failed"
              if cand else (outcome.error or ""))  # fmt: skip
    text = f"gate exit {outcome.exit_code} ({verdict}) {ended - fired['at']:.0f}s after the {sig.name}: {detail}"
    return Finding(sent, failed, text, outcome.exit_code != 0)


def kill_at_weight(d: Drills) -> Finding:
    """Candidate at 30% under load, SIGKILLed: no client request may fail (nginx retries the
    other slot), `canary status` shows it dead, `canary promote` refuses, stable serves."""
    d.weight(WEIGHT)
    load = d.load("kill-at-30")
    try:
        before = d.shares(400)
        what = d.hit(d.cand, signal.SIGKILL)
        d.say(f"under load: {d.describe_split(before)}; {what}")
        after = d.shares(1500, settle_s=1.0)
        d.say(f"after the kill: {d.describe_split(after)}")
    finally:
        stats = load.stop()
    status = d.cli("status")
    line = next((x for x in status.stdout.splitlines() if x.startswith(d.cand)), "")
    shown = "DEAD" in line
    state = d.stack.store.load()
    promote = d.cli("promote", "--bake", "0")
    unchanged, serves = d.stack.store.load() == state, d.stable_serves()
    ok = (stats.failures == 0 and before[d.cand] > 0 and after[d.cand] == 0 and shown and promote.returncode == 1
          and "Traceback" not in promote.stderr and unchanged and serves)  # fmt: skip
    text = (f"{count(stats.failures)} failed; {d.cand} answered 0 of {count(sum(after.values()))} requests after "
            f"the kill; status: {d.cand} {'DEAD' if shown else 'not shown dead'}"
            f"{' (nginx: down)' if 'nginx: down' in line else ''}; promote exit {promote.returncode}: "
            f"{_last_line(promote)}; state {'unchanged' if unchanged else 'CHANGED'}; "
            f"stable {'still serves' if serves else 'does NOT serve'}")  # fmt: skip
    return Finding(stats.requests, stats.failures, text, ok)


def freeze_at_weight(d: Drills) -> Finding:
    """Candidate at 30% under load, SIGSTOPped: nginx times it out and retries on stable."""
    d.weight(WEIGHT)
    load = d.load("sigstop-at-30")
    try:
        before = d.shares(400)
        what = d.hit(d.cand, signal.SIGSTOP)
        d.say(f"under load: {d.describe_split(before)}; {what} for {FREEZE_S:g}s")
        t0 = time.monotonic()
        time.sleep(0.2)  # answers the candidate sent just before it froze are logged by now
        start = d.served()
        down_at = None
        while time.monotonic() - t0 < FREEZE_S:
            if down_at is None and d.router()["slots"][d.cand]["down"]:
                down_at = time.monotonic() - t0
            time.sleep(0.5)
        end = d.served()
        d.say(d.hit(d.cand, signal.SIGCONT))
    finally:
        stats = load.stop()
    during = {slot: end[slot] - start[slot] for slot in end}
    ok = stats.failures == 0 and during[d.cand] == 0 and down_at is not None
    marked = f"marked down after {down_at:.0f}s" if down_at is not None else "never marked down"
    text = (f"{count(stats.failures)} failed; frozen {d.cand} answered {during[d.cand]} of "
            f"{count(sum(during.values()))} requests in {FREEZE_S:g}s: nginx timed it out after "
            f"{d.settings.upstream_timeout_s:g}s and retried on {d.stable} ({marked}); slowest answer "
            f"{stats.max_ms / 1000:.1f}s")  # fmt: skip
    return Finding(stats.requests, stats.failures, text, ok)


def overload_stable(d: Drills) -> Finding:
    """At 0%, 24 parallel 1024-row requests (no X-Canary) overflow stable's queue while
    Locust runs: stable sheds with 503 + Retry-After, not one unforced request reaches the
    candidate (nginx's counters and every answer's X-Canary-Slot), stable is never marked down."""
    import numpy as np

    rows = np.random.default_rng(0).uniform(0, 16, (1024, 64)).astype(np.float32)
    body = {"inputs": [{"name": "input", "shape": [1024, 64], "datatype": "FP32", "data": rows.ravel().tolist()}],
            "parameters": {"cache": False}}  # fmt: skip
    start = d.served()
    load = d.load("overload")
    try:
        answers = d.post_many(body, 24)
        marked_down = d.router()["slots"][d.stable]["down"]
        time.sleep(1.0)
    finally:
        stats = load.stop()
    end = d.served()
    big = [a for a in answers if isinstance(a, httpx.Response)]
    shed = sum(1 for a in big if a.status_code == 503 and a.headers.get("retry-after"))
    big_failed = len(answers) - sum(1 for a in big if a.status_code == 200)
    reached = end[d.cand] - start[d.cand]
    by_header = stats.answered_by(d.cand) + sum(a.headers.get("x-canary-slot") == d.cand for a in big)
    unforced = sum(end.values()) - sum(start.values())
    ok = reached == 0 and by_header == 0 and shed > 0 and not marked_down
    small = f", {count(stats.failures)} small ones too ({stats.top_failure})" if stats.failures else ""
    text = (f"{shed} of 24 big requests shed by {d.stable} with 503 + Retry-After{small}; {reached} of "
            f"{count(unforced)} unforced requests reached {d.cand} (nginx counters; {by_header} by X-Canary-Slot); "
            f"{d.stable} {'MARKED DOWN' if marked_down else 'never marked down'}"
            f"{'' if shed else '; stable was never overloaded: the drill proved nothing'}")  # fmt: skip
    return Finding(stats.requests + len(answers), stats.failures + big_failed, text, ok)


def restart_redis(d: Drills) -> Finding:
    """Redis SIGKILLed under load for 6 s, then restarted: the cache fails open (misses, no
    errors to clients) and serves hits again after the restart."""
    from models.data import load_split

    digits = load_split().x_test[:32]  # few inputs, cache on: after one round, hits
    url = f"http://{d.settings.host}:{d.settings.nginx_rest_port}/v2/models/digits/infer"
    codes: list[int] = []
    stop = threading.Event()

    def cached_traffic() -> None:
        with httpx.Client(timeout=30) as client:
            for i in range(10**9):
                if stop.is_set():
                    return
                row = digits[i % len(digits)].tolist()
                try:
                    codes.append(
                        client.post(
                            url, json={"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}]}
                        ).status_code
                    )
                except httpx.HTTPError:
                    codes.append(0)
                time.sleep(0.01)

    load = d.load("redis")
    thread = threading.Thread(target=cached_traffic, name="chaos-cached", daemon=True)
    thread.start()
    try:
        time.sleep(3)
        first = d.cache_events()
        pid = d.stack.process("redis").pid
        if not d.stack.process("redis").alive or pid is None:
            raise CanaryError("redis is not running")
        kill_tree(pid, signal.SIGKILL)
        d.say(f"SIGKILL to redis (pid {pid}); serving without it for 6 s")
        time.sleep(6)
        outage = d.cache_events()
        d.stack.start_redis()
        d.say(f"redis restarted (pid {d.stack.process('redis').pid})")
        time.sleep(6)
        back = d.cache_events()
    finally:
        stop.set()
        thread.join(30)
        stats = load.stop()
    errors = outage.get("error", 0) - first.get("error", 0)
    hits = back.get("hit", 0) - outage.get("hit", 0)
    cached_failed = sum(code != 200 for code in codes)
    failed = stats.failures + cached_failed
    ok = failed == 0 and errors > 0 and hits > 0
    text = (
        f"{count(failed)} failed (of them {count(len(codes))} with the cache on); Redis gone 6 s: "
        f"{errors:.0f} cache errors answered as misses; {hits:.0f} cache hits after the restart"
    )
    return Finding(stats.requests + len(codes), failed, text, ok)


def restart_nginx(d: Drills) -> Finding:
    """nginx stopped and started under load at 30%: what clients lose while it is down, and
    routing back from the routing file (state, file and nginx agree; the split matches)."""
    d.weight(WEIGHT)
    load = d.load("nginx")
    try:
        d.shares(300)
        t0 = time.monotonic()
        nginx = d.stack.nginx()
        nginx.stop()
        nginx.start()
        gap = time.monotonic() - t0
        d.say(f"nginx stopped and started again in {gap:.1f}s")
        agree, routing = d.routing_agrees()
        after = d.shares(600, settle_s=1.0)
    finally:
        stats = load.stop()
    ok = agree and d.split_ok(after)
    why = f" ({stats.top_failure})" if stats.failures else ""
    text = (
        f"{count(stats.failures)} failed while nginx restarted ({gap:.1f}s){why}; routing back from "
        f"routing.json: {routing}, measured {d.describe_split(after)}"
    )
    return Finding(stats.requests, stats.failures, text, ok)


def kill_canary_mid_rollout(d: Drills) -> Finding:
    """`canary rollout` (a subprocess) SIGKILLed during its first gate, under load: state
    file, routing file and nginx agree, traffic is where the state says, the release lock
    is free (`canary rollback` works at once)."""
    load = d.load("canary-killed")
    log_path = d.folder / "canary-rollout.log"
    argv = [venv_bin("canary"), "rollout", "--steps", f"{WEIGHT},100", "--step-duration", f"{GATE.duration_s:g}s",
            "--users", str(GATE.users), "--bake", "60"]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, env={**os.environ, **stack_env(d.settings)}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    orphans: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not any("locust" in _cmdline(p) for p in descendants(proc.pid)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise CanaryError(f"`canary rollout` reached no gate (exit {proc.poll()}); see {log_path}")
            time.sleep(0.2)
        time.sleep(5.0)  # the gate's Locust is loading both slots
        children = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        orphans = [p for p in children if "locust" in _cmdline(p)]
        for pid in orphans:  # its gate's Locust (own session) would run on for the rest of the gate
            kill_tree(pid, signal.SIGKILL)
        d.say(f"SIGKILL to `canary rollout` (pid {proc.pid}) mid-gate at {d.stack.store.load().weight}%; "
              f"its orphaned gate Locust stopped")  # fmt: skip
        agree, routing = d.routing_agrees()
        split = d.shares(600, settle_s=1.0)
        where_state_says = d.split_ok(split)
        t0 = time.monotonic()
        rollback = d.cli("rollback", "--reason", "chaos: canary was SIGKILLed mid-rollout", timeout=90)
        took = time.monotonic() - t0
        after = d.shares(300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stats = load.stop()
    ok = agree and where_state_says and rollback.returncode == 0 and after[d.cand] == 0
    text = (f"{count(stats.failures)} failed; after the kill state, routing file and nginx agree: {routing}, "
            f"measured {d.describe_split(split)}; lock free: `canary rollback` exit {rollback.returncode} in "
            f"{took:.1f}s, then {d.cand} {share_percent(after, d.cand):.0f}%")  # fmt: skip
    return Finding(stats.requests, stats.failures, text, ok)


def promote_dead_candidate(d: Drills) -> Finding:
    """The candidate SIGKILLed at 0%, then `canary promote --bake 0` under load: exit 1,
    state and MLflow alias champion unchanged, stable serves every request."""
    champion = _champion(d.home)
    d.say(d.hit(d.cand, signal.SIGKILL))
    load = d.load("promote-dead")
    try:
        state = d.stack.store.load()
        promote = d.cli("promote", "--bake", "0")
        unchanged = d.stack.store.load() == state
        split = d.shares(300)
    finally:
        stats = load.stop()
    kept = _champion(d.home) == champion
    ok = (promote.returncode == 1 and "Traceback" not in promote.stderr and unchanged and kept
          and split[d.cand] == 0 and stats.failures == 0)  # fmt: skip
    text = (f"promote exit {promote.returncode}: {_last_line(promote)}; state "
            f"{'unchanged' if unchanged else 'CHANGED'}, champion alias {'unchanged' if kept else 'MOVED'}; "
            f"{d.stable} answered {split[d.stable]} of {sum(split.values())} requests measured")  # fmt: skip
    return Finding(stats.requests, stats.failures, text, ok)


def _champion(home: CanaryHome) -> int | None:
    from models.registry import CHAMPION, Registry

    try:
        return Registry(home).resolve(alias=CHAMPION).version
    except CanaryError:
        return None


FLOOD_S, FLOOD_CLIENTS, FLOOD_BYTES = 20.0, 4, 8_000_000


def flood_stable(d: Drills) -> Finding:
    """4 clients post 8 MiB JSON bodies ending in a NaN literal to stable's V2 listener in a
    loop for 20 s (each costs a full parse before it can be refused): every answer is a 4xx,
    a /v2/health/ready probe every 100 ms answers within 1 s, and the slot's memory (its
    whole process tree) stays under 3x its idle size."""
    import threading

    import psutil

    ports = d.settings.slot_ports(d.stable)
    base = f"http://{d.settings.host}:{ports.v2}"
    values = b",".join([b"0.5"] * ((FLOOD_BYTES - 100) // 4))
    body = b'{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":[' + values + b",NaN]}]}"
    pid = d.slot_pid(d.stable)

    def rss() -> int:
        total = 0
        for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    idle = rss()
    stop = threading.Event()
    codes: list[int | str] = []

    def flood() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                try:
                    codes.append(client.post(f"{base}/v2/models/digits/infer", content=body,
                                             headers={"content-type": "application/json"}).status_code)  # fmt: skip
                except httpx.HTTPError as exc:
                    codes.append(type(exc).__name__)

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(FLOOD_CLIENTS)]
    for thread in threads:
        thread.start()
    probes: list[float] = []
    peak = idle
    deadline = time.monotonic() + FLOOD_S
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                ok = client.get(f"{base}/v2/health/ready").status_code == 200
            except httpx.HTTPError:
                ok = False
            probes.append(time.monotonic() - started if ok else float("inf"))
            peak = max(peak, rss())
            time.sleep(0.1)
    stop.set()
    for thread in threads:
        thread.join(60)
    refused = sum(1 for code in codes if isinstance(code, int) and 400 <= code < 500)
    slowest = max(probes, default=float("inf"))
    ok = refused == len(codes) > 0 and slowest < 1.0 and peak < 3 * idle
    text = (f"{refused} of {len(codes)} flood bodies refused with a 4xx ({sorted({str(c) for c in codes})}); "
            f"{len(probes)} health probes, slowest {slowest * 1000:.0f} ms (limit 1000); memory "
            f"{idle / 2**20:.0f} MiB idle, {peak / 2**20:.0f} MiB peak ({peak / idle:.1f}x, limit 3x)")  # fmt: skip
    return Finding(len(codes) + len(probes), len(codes) - refused + sum(p == float("inf") for p in probes), text, ok)
