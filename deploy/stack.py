"""The local stack: Redis, two Bento slots and nginx as supervised local processes.

`LocalStack` owns the processes it starts (pid files under the state folder, each checked
against its command line before it is signalled) and executes `ReleasePlan`s: start and
smoke-test a slot, then change routing through nginx's admin API (no reload), then record
the new state and the audit line. A failure before routing changes leaves traffic as it was.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import httpx
import psutil
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from deploy.process import serving_home, spawn, stop_tree, venv_bin, wait_http_ok
from deploy.release import ReleasePlan, plan_initial
from deploy.state import SLOTS, ReleaseState, StateStore
from models.errors import CanaryError
from models.home import CanaryHome


class StackSettings(BaseSettings):
    """Ports and timeouts of the local stack (env prefix CANARY_STACK_)."""

    model_config = SettingsConfigDict(env_prefix="CANARY_STACK_", extra="ignore", frozen=True)

    name: str = Field(default="stack", description="Folder of this stack in the state folder; tests run several.")
    host: str = Field(default="127.0.0.1", description="Address every local process binds.")
    public_host: str = Field(
        default="", description="Address nginx's public REST and gRPC listeners bind; empty: `host`. "
        "0.0.0.0 serves other machines while the slots, Redis and the admin listener stay on `host`.",
    )  # fmt: skip
    nginx_rest_port: int = Field(default=8080, description="Public REST listener.")
    nginx_grpc_port: int = Field(default=8081, description="Public gRPC (HTTP/2) listener.")
    nginx_admin_port: int = Field(default=8079, description="Loopback-only admin listener (routing).")
    blue_rest_port: int = Field(default=3001, description="Blue slot REST port.")
    blue_grpc_port: int = Field(default=50051, description="Blue slot gRPC port.")
    green_rest_port: int = Field(default=3002, description="Green slot REST port.")
    green_grpc_port: int = Field(default=50052, description="Green slot gRPC port.")
    blue_v2_port: int = Field(default=8001, description="Blue slot's own V2 REST listener (nginx sends /v2/ here).")
    green_v2_port: int = Field(default=8002, description="Green slot's own V2 REST listener.")
    redis_port: int = Field(default=6390, description="Redis (shared response cache).")
    slot_ready_timeout_s: float = Field(default=180.0, description="How long a new slot may take to get ready.")
    # -- release safety (see nginx/lua/canary_router.lua and deploy/bake.py)
    router_max_fails: int = Field(
        default=3, ge=1, description="Transport failures (connect error, reset, timeout) of a slot within "
        "router_fail_timeout_s that take it out of unforced rotation; a slot's own 503 never counts.",
    )  # fmt: skip
    router_fail_timeout_s: int = Field(
        default=10, ge=1, description="Window for router_max_fails, and how long a failed slot stays out."
    )
    upstream_timeout_s: float = Field(
        default=10.0, gt=0, description="How long nginx waits for a slot's answer; then an unforced request "
        "moves to the other slot and a forced one gets 503.",
    )  # fmt: skip
    force_allow: list[str] = Field(
        default_factory=list, description="Networks (CIDR) whose clients may force a slot with X-Canary "
        "without the force token (JSON list). Empty: only the token in force.token forces.",
    )  # fmt: skip
    bake_s: float = Field(
        default=120.0, ge=0, description="After promote, how long the new stable is watched against the "
        "gate's SLOs, the old stable kept warm to switch back to; 0 = no bake.",
    )  # fmt: skip
    bake_interval_s: float = Field(default=2.0, gt=0, description="How often the bake reads the new stable's metrics.")
    bake_window_s: float = Field(default=30.0, gt=0, description="Sliding window the bake judges.")
    bake_min_requests: int = Field(default=20, ge=1, description="Requests a bake window needs to be judged.")

    def slot_ports(self, slot: str) -> SlotPorts:
        return SlotPorts(*(getattr(self, f"{slot}_{kind}_port") for kind in ("rest", "grpc", "v2")))

    @property
    def nginx_public_host(self) -> str:
        """Where clients reach nginx: `public_host`, else `host` (loopback by default), so
        nothing listens on every interface unless someone asked for it."""
        return self.public_host or self.host


class SlotPorts(NamedTuple):
    rest: int  # BentoML's HTTP server (native API, /metrics)
    grpc: int  # V2 gRPC
    v2: int  # the Bento's own V2 REST listener


@dataclass(frozen=True)
class ProcessInfo:
    name: str
    pid: int | None
    alive: bool


def _runs(cmdline: list[str], marker: str) -> bool:
    """The marker's words appear in the command line as whole words, in order and together:
    `serve digits-service:v1` is not `serve digits-service:v10`."""
    words, wanted = " ".join(cmdline).split(), marker.split()
    return any(words[i : i + len(wanted)] == wanted for i in range(len(words) - len(wanted) + 1))


class LocalStack:
    def __init__(self, home: CanaryHome, settings: StackSettings | None = None) -> None:
        self.home = home
        self.settings = settings or StackSettings()
        name = self.name = self.settings.name
        self.folder = home.home / name
        self.run_dir = self.folder / "run"
        self.logs = home.logs / name
        self.store = StateStore(self.folder)
        self.routing_file = self.folder / "routing.json"
        self.token_file = self.folder / "admin.token"
        self.force_token_file = self.folder / "force.token"  # lets the gate force a slot (mode 0600)
        self.redis_password_file = self.folder / "redis.password"  # Redis AUTH (mode 0600)
        self.cache_key_file = self.folder / "cache.key"  # signs cache entries, shared by the slots (0600)

    # -- processes ----------------------------------------------------------------------
    def _pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def process(self, name: str) -> ProcessInfo:
        """Our process `name`, alive only if its pid still runs the very process we started:
        the start time we recorded (psutil) and the command-line marker (not the exact
        command line: redis-server rewrites its process title), so a recycled pid is never
        ours and is never signalled."""
        path = self._pid_file(name)
        if not path.exists():
            return ProcessInfo(name, None, False)
        record = json.loads(path.read_text())
        try:
            process = psutil.Process(record["pid"])
            started, cmdline = process.create_time(), process.cmdline()
        except psutil.Error:
            return ProcessInfo(name, record["pid"], False)
        same_start = "started" not in record or abs(started - record["started"]) < 0.01  # older records: marker only
        ours = same_start and _runs(cmdline, record["marker"])
        return ProcessInfo(name, record["pid"], ours and process.status() != psutil.STATUS_ZOMBIE)

    def _record(self, name: str, pid: int, marker: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        entry: dict[str, object] = {"pid": pid, "marker": marker}
        try:
            process = psutil.Process(pid)
            entry["started"] = process.create_time()
        except psutil.Error:
            pass  # already gone: the marker alone will say it is not ours
        self._pid_file(name).write_text(json.dumps(entry))

    def _stop(self, name: str, timeout: float = 20.0) -> None:
        info = self.process(name)
        if info.alive and info.pid:
            stop_tree(info.pid, lambda: not self.process(name).alive, timeout)
        self._pid_file(name).unlink(missing_ok=True)

    def _require_free(self, port: int, what: str, env: str, host: str | None = None) -> None:
        """`port` on `host` (default: the stack's host) is free, or one line naming the setting."""
        host = host or self.settings.host
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                raise CanaryError(f"port {port} ({what}) is already taken; free it or set {env}") from None

    def _require_free_ports(self) -> None:
        """Before starting anything: every port of a component that is not running must be free."""
        s = self.settings
        wanted = [("redis", s.redis_port, "redis", "REDIS_PORT")]
        for slot in SLOTS:
            rest, grpc, v2 = s.slot_ports(slot)
            wanted += [(f"slot-{slot}", rest, f"{slot} REST", f"{slot.upper()}_REST_PORT"),
                       (f"slot-{slot}", grpc, f"{slot} gRPC", f"{slot.upper()}_GRPC_PORT"),
                       (f"slot-{slot}", v2, f"{slot} V2 REST", f"{slot.upper()}_V2_PORT")]  # fmt: skip
        for process, port, what, env in wanted:
            if not self.process(process).alive:
                self._require_free(port, what, f"CANARY_STACK_{env}")
        if not self.nginx().running():  # its public listeners bind their own host
            for port, what, env, host in ((s.nginx_rest_port, "nginx REST", "NGINX_REST_PORT", s.nginx_public_host),
                                          (s.nginx_grpc_port, "nginx gRPC", "NGINX_GRPC_PORT", s.nginx_public_host),
                                          (s.nginx_admin_port, "nginx admin", "NGINX_ADMIN_PORT", s.host)):  # fmt: skip
                self._require_free(port, what, f"CANARY_STACK_{env}", host)

    # -- redis ----------------------------------------------------------------------------
    @property
    def redis_url(self) -> str:
        return f"redis://{self.settings.host}:{self.settings.redis_port}/0"

    def cache_secrets(self) -> tuple[str, str]:
        """Redis' password and the cache entries' signing key, each generated once (mode 0600)."""
        from deploy.nginx import ensure_token

        return ensure_token(self.redis_password_file), ensure_token(self.cache_key_file)

    def start_redis(self) -> None:
        if self.process("redis").alive:
            return
        port = self.settings.redis_port  # checked free by up() before anything starts
        data = self.run_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        marker = f"redis-server {self.settings.host}:{port}"
        password = self.cache_secrets()[0]
        config = data / "redis.conf"  # the password goes in a 0600 file, never on the command line (ps)
        config.touch(mode=0o600)
        config.chmod(0o600)
        config.write_text(f"requirepass {password}\n")
        argv = ["redis-server", str(config), "--port", str(port), "--bind", self.settings.host, "--save", "",
                "--appendonly", "no", "--dir", str(data)]  # fmt: skip
        child = spawn(argv, self.logs / "redis.log")
        self._record("redis", child.pid, marker)
        import redis

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if redis.Redis(host=self.settings.host, port=port, password=password, socket_timeout=1).ping():
                    return
            except redis.RedisError:
                time.sleep(0.1)
        raise CanaryError(f"redis-server did not start on port {port}; see {self.logs / 'redis.log'}")

    # -- slots ----------------------------------------------------------------------------
    def slot_url(self, slot: str) -> str:
        return f"http://{self.settings.host}:{self.settings.slot_ports(slot).rest}"

    def slot_v2_url(self, slot: str) -> str:
        """The slot's own V2 REST listener: where nginx sends /v2/ traffic."""
        return f"http://{self.settings.host}:{self.settings.slot_ports(slot).v2}"

    def start_slot(self, slot: str, bento: str, model_version: str) -> None:
        """Start `bento` in `slot`, wait for readiness and a correct smoke inference."""
        self._stop(f"slot-{slot}")
        rest, grpc, v2 = self.settings.slot_ports(slot)
        upper = slot.upper()
        self._require_free(rest, f"{slot} REST", f"CANARY_STACK_{upper}_REST_PORT")
        self._require_free(grpc, f"{slot} gRPC", f"CANARY_STACK_{upper}_GRPC_PORT")
        self._require_free(v2, f"{slot} V2 REST", f"CANARY_STACK_{upper}_V2_PORT")
        redis_password, cache_key = self.cache_secrets()
        env = {
            "BENTOML_HOME": str(serving_home(self.home.bentoml_home, f"{self.name}-slot-{slot}")),
            "CANARY_SERVICE_SLOT": slot,
            "CANARY_SERVICE_GRPC_PORT": str(grpc),
            "CANARY_SERVICE_GRPC_HOST": self.settings.host,
            "CANARY_SERVICE_REST_PORT": str(v2),
            "CANARY_SERVICE_REST_HOST": self.settings.host,
            "CANARY_SERVICE_CACHE_URL": self.redis_url,
            "CANARY_SERVICE_CACHE_PASSWORD": redis_password,  # the environment, not argv: private to us
            "CANARY_SERVICE_CACHE_HMAC_KEY": cache_key,
            **self._prediction_log_env(redis_password),
            # Two slots share this machine: split the cores between them, or idle ONNX Runtime
            # threads spin-wait and the slots starve each other (seen as 2-3x latency swings).
            "CANARY_SERVICE_INTRA_OP_THREADS": os.environ.get(
                "CANARY_SERVICE_INTRA_OP_THREADS", str(max(1, (os.cpu_count() or 2) // len(SLOTS)))
            ),
        }
        argv = [venv_bin("bentoml"), "serve", bento, "--host", self.settings.host, "--port", str(rest)]
        child = spawn(argv, self.logs / f"slot-{slot}.log", env)
        self._record(f"slot-{slot}", child.pid, f"serve {bento}")
        try:
            wait_http_ok(child, f"{self.slot_url(slot)}/v2/health/ready", self.settings.slot_ready_timeout_s)
            self.smoke_test(slot, model_version)
        except CanaryError:
            self._stop(f"slot-{slot}")
            raise

    def _prediction_log_env(self, redis_password: str) -> dict[str, str]:
        """The slots log every answer to the stack's Redis, unless the environment already
        names a store (CANARY_SERVICE_PREDICTION_LOG_URL, e.g. a production PostgreSQL)."""
        if os.environ.get("CANARY_SERVICE_PREDICTION_LOG_URL"):
            return {}
        return {"CANARY_SERVICE_PREDICTION_LOG_URL": self.redis_url,
                "CANARY_SERVICE_PREDICTION_LOG_PASSWORD": redis_password}  # fmt: skip

    def prediction_store(self):
        """The store the slots log to (`service.sinks`): the stack's Redis, or the one the
        environment names. Nothing connects until it is used."""
        from service.sinks import open_store

        url = os.environ.get("CANARY_SERVICE_PREDICTION_LOG_URL")
        if url:
            return open_store(url, password=os.environ.get("CANARY_SERVICE_PREDICTION_LOG_PASSWORD") or None,
                              timeout_s=5.0)  # fmt: skip
        if not self.redis_password_file.exists():
            raise CanaryError("this stack has never run, so it has no prediction log: `canary up` first")
        return open_store(self.redis_url, password=self.cache_secrets()[0], timeout_s=5.0)

    def smoke_test(self, slot: str, model_version: str, state: ReleaseState | None = None) -> None:
        from models.data import load_split

        split = load_split()
        rows = split.x_test[:8]
        body = {"inputs": [{"name": "input", "shape": [8, 64], "datatype": "FP32", "data": rows.tolist()}],
                "parameters": {"cache": False}}  # fmt: skip  # the model must answer, not the cache
        # through the V2 listener: the path nginx sends clients' /v2/ traffic to
        try:
            answer = httpx.post(f"{self.slot_v2_url(slot)}/v2/models/digits/infer", json=body, timeout=15.0,
                                headers={"X-Request-Id": f"smoke-{slot}-{os.urandom(6).hex()}"})  # fmt: skip
        except httpx.HTTPError as exc:
            raise CanaryError(f"smoke inference on slot {slot} failed: {type(exc).__name__} {exc}") from None
        got = answer.json().get("model_version") if answer.status_code == 200 else None
        if got != model_version:
            raise CanaryError(
                f"smoke inference on slot {slot} failed: HTTP {answer.status_code}, model version {got!r} "
                f"(want {model_version!r}) {answer.text[:200]}"
            )

    def check_slot(self, slot: str, model_version: str) -> None:
        """Right before a slot takes more traffic: alive, ready, and a correct smoke inference."""
        if problem := self.slot_problem(slot):
            raise CanaryError(f"{problem}; traffic stays where it was")
        try:
            self.smoke_test(slot, model_version)
        except CanaryError as exc:
            raise CanaryError(f"{exc}; traffic stays where it was") from None

    def slot_metrics(self, slot: str) -> str:
        """The slot's Prometheus text (its /metrics), for the bake."""
        from deploy.bake import MetricsUnavailable

        try:
            answer = httpx.get(f"{self.slot_url(slot)}/metrics", timeout=5.0)
            answer.raise_for_status()
        except httpx.HTTPError as exc:
            raise MetricsUnavailable(f"{type(exc).__name__} {exc}") from None
        return answer.text

    def slot_problem(self, slot: str) -> str | None:
        """Why `slot` cannot serve right now (process gone, health failing), or None."""
        if not self._slot_running(slot):
            return f"slot {slot}'s process is gone"
        try:
            code = httpx.get(f"{self.slot_url(slot)}/v2/health/ready", timeout=3.0).status_code
        except httpx.HTTPError as exc:
            return f"slot {slot} does not answer its health check ({type(exc).__name__})"
        return None if code == 200 else f"slot {slot} is not ready (HTTP {code})"

    def stop_slot(self, slot: str) -> None:
        self._stop(f"slot-{slot}")

    # -- nginx ----------------------------------------------------------------------------
    def nginx(self):
        from deploy.nginx import NginxController

        return NginxController(self.folder / "nginx", admin_port=self.settings.nginx_admin_port)

    def _slot_addresses(self):
        from deploy.nginx import SlotAddress

        return [SlotAddress(slot, self.settings.host, *self.settings.slot_ports(slot)) for slot in SLOTS]

    def _routing(self, state: ReleaseState):
        from deploy.nginx import Routing

        return Routing(state.stable, state.candidate, state.weight, state.shadow)

    def apply_nginx_config(self, state: ReleaseState) -> None:
        from deploy.nginx import NginxPorts, ensure_token, render_config, write_routing_file

        ensure_token(self.token_file)
        ensure_token(self.force_token_file)
        write_routing_file(self.routing_file, self._routing(state), self._slot_addresses())
        controller = self.nginx()  # its ports were checked free by up() before anything started
        generation = int(time.time() * 1000) % 2_000_000_000
        s = self.settings
        ports = NginxPorts(s.nginx_rest_port, s.nginx_grpc_port, s.nginx_admin_port, s.nginx_public_host)
        config = render_config(
            controller.prefix,
            ports,
            self._slot_addresses(),
            self.routing_file,
            self.token_file,
            generation,
            **self._router_options(),
        )
        controller.apply(config, generation)

    def _router_options(self) -> dict:
        s = self.settings
        return {"max_fails": s.router_max_fails, "fail_timeout_s": s.router_fail_timeout_s,
                "upstream_timeout_s": s.upstream_timeout_s, "force_allow": tuple(s.force_allow),
                "force_token_file": self.force_token_file}  # fmt: skip

    def force_token(self) -> str:
        """The token that lets a client (the gate) force a slot with X-Canary."""
        from deploy.nginx import ensure_token

        return ensure_token(self.force_token_file)

    def set_routing(self, state: ReleaseState) -> None:
        from deploy.nginx import ensure_token, write_routing_file

        write_routing_file(self.routing_file, self._routing(state), self._slot_addresses())
        self.nginx().set_routing(self._routing(state), ensure_token(self.token_file))

    # -- the commands -------------------------------------------------------------------
    def up(self, champion: tuple[str, str] | None) -> ReleaseState:
        """Start whatever is not running; with nothing deployed, serve `champion` (bento, version)."""
        with self.store.locked():
            state = self.store.load()
            self._start_shared_services()
            if state.slots[state.stable].bento is None:
                if champion is None:
                    raise CanaryError("nothing to serve: train, export and build a model first (make demo does)")
                plan = plan_initial(state, *champion)
                state = plan.after
                self.store.history.append("up", f"{champion[0]} in slot {state.stable}", plan.reason)
            for slot in SLOTS:
                slot_state = state.slots[slot]
                if slot_state.bento and not self._slot_running(slot) and (slot in (state.stable, state.candidate)):
                    self.start_slot(slot, slot_state.bento, slot_state.model_version or "")
            self.apply_nginx_config(state)
            self.store.save(state)
            return state

    def _start_shared_services(self) -> None:
        """Before any slot: every port checked free, then the shared Redis."""
        self._require_free_ports()
        self.start_redis()

    def _slot_running(self, slot: str) -> bool:
        return self.process(f"slot-{slot}").alive

    def down(self) -> list[str]:
        """Stop every process this stack started (and nothing else)."""
        stopped = []
        with self.store.locked():
            if self.nginx().running():
                self.nginx().stop()
                stopped.append("nginx")
            for name in ("slot-blue", "slot-green", "redis"):
                if self.process(name).alive:
                    stopped.append(name)
                self._stop(name)
        return stopped

    def execute(self, plan: ReleasePlan, on_champion=None) -> ReleaseState:
        """Apply a plan: start + check a slot, change routing, persist, stop, audit."""
        with self.store.locked():
            current = self.store.load()
            if current.generation != plan.before.generation:
                raise CanaryError("the release state changed while planning; run the command again")
            if not self.nginx().running():
                raise CanaryError("the stack is not running: run `canary up` first")
            if plan.start_slot:
                slot, bento = plan.start_slot
                self.start_slot(slot, bento, plan.after.slots[slot].model_version or "")
            for slot in plan.check_slots:  # a dead or wrong slot never gets more traffic
                if not plan.start_slot or slot != plan.start_slot[0]:
                    self.check_slot(slot, plan.after.slots[slot].model_version or "")
            self.set_routing(plan.after)
            self.store.save(plan.after)
            if plan.stop_slot:
                self.stop_slot(plan.stop_slot)
            if plan.champion_version and on_champion is not None:
                on_champion(plan.champion_version)
            detail = "; ".join(line.strip() for line in plan.describe()[1:]) or "routing unchanged"
            self.store.history.append(plan.action, detail, plan.reason, generation=plan.after.generation)
            return plan.after

    def status(self) -> dict:
        state = self.store.load()
        slots = {}
        for slot in SLOTS:
            role = "stable" if slot == state.stable else "candidate" if slot == state.candidate else "idle"
            share = (
                (100 - state.weight if state.candidate else 100)
                if role == "stable"
                else state.weight
                if role == "candidate"
                else 0
            )
            slots[slot] = {
                "role": role, "bento": state.slots[slot].bento, "model_version": state.slots[slot].model_version,
                "weight": share, **self._slot_status(slot),
            }  # fmt: skip
        router: dict = {}
        nginx_running = self.nginx().running()
        if nginx_running and self.token_file.exists():
            try:
                router = self.nginx().status(self.token_file.read_text().strip())
            except Exception as exc:  # noqa: BLE001 - status must always answer
                router = {"error": str(exc)}
        return {
            "stable": state.stable, "candidate": state.candidate, "weight": state.weight, "shadow": state.shadow,
            "slots": slots, "nginx": {"running": nginx_running, "rest": self.settings.nginx_rest_port,
                                      "grpc": self.settings.nginx_grpc_port, "router": router},
            "redis": self._redis_running(), "last_gate": state.last_gate, "note": state.note,
            "baking": state.baking,
            **self._status_extra(state),
        }  # fmt: skip

    def _slot_status(self, slot: str) -> dict:
        """Process, health and addresses of one slot, for `status`."""
        info = self.process(f"slot-{slot}")
        healthy = info.alive and self.slot_problem(slot) is None  # the same check as before routing
        return {
            "pid": info.pid if info.alive else None, "alive": info.alive, "healthy": healthy,
            "rest": self.slot_url(slot), "v2": self.slot_v2_url(slot),
            "grpc": f"{self.settings.host}:{self.settings.slot_ports(slot).grpc}",
        }  # fmt: skip

    def _redis_running(self) -> bool:
        return self.process("redis").alive

    def _status_extra(self, state: ReleaseState) -> dict:
        return {"online_accuracy": self.online_accuracy()}

    def online_accuracy(self) -> dict:
        """Per model version: labels posted through feedback and the share predicted right;
        {"error": ...} when the log's store cannot be read (status must always answer)."""
        from deploy.predictions import online_accuracy

        if not self._redis_running() and not os.environ.get("CANARY_SERVICE_PREDICTION_LOG_URL"):
            return {"error": "the stack's Redis is not running"}
        try:
            store = self.prediction_store()
        except (CanaryError, ValueError) as exc:
            return {"error": str(exc)}
        try:
            return online_accuracy(store, self.home.registered_model)
        except Exception as exc:  # noqa: BLE001 - status must always answer
            return {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            store.close()
