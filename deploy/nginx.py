"""Render, apply and steer the nginx traffic layer in front of the blue/green slots.

nginx routes with a Lua balancer that reads a shared dict (`nginx/lua/canary_router.lua`),
so weights move through the loopback admin API without `nginx -s reload` (a reload of
nginx 1.22 closes idle keep-alive connections and loses requests). This module renders
`nginx/nginx.conf.j2`, applies it (`nginx -t`, atomic swap, start or reload, then confirm
the config generation nginx reports) and talks to the admin API. It knows no Bento or CLI.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jinja2

from deploy.state import write_atomic
from models.errors import CanaryError

NGINX_DIR = Path(__file__).resolve().parent.parent / "nginx"
MODULES_DIR = Path("/usr/lib/nginx/modules")  # Debian's libnginx-mod-http-lua and -ndk
_SLOT_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_UNSAFE_PATH = re.compile(r'["$\n\r]|\]==\]')  # would break out of a quoted nginx or Lua string
_CIDR = re.compile(r"^[0-9A-Fa-f:.]+(/\d{1,3})?$")
_SEVERITY = (r"\[(emerg|alert|crit)\]", r"init_by_lua error", r"\[error\]")


class NginxError(CanaryError):
    """nginx could not be started, reloaded, stopped or asked; the message is one line."""


class NginxConfigError(NginxError):
    """A config nginx refused or did not confirm; the previously running config stays live."""


def _check_port(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{what} must be a port number 1-65535, got {value!r}")


@dataclass(frozen=True)
class NginxPorts:
    """nginx's listeners: public REST (HTTP/1.1), public gRPC (h2c), admin (127.0.0.1 only).

    `public_host` is the address the public listeners bind: loopback unless the caller names
    another (0.0.0.0 serves every interface), so no listener is open to the network by
    accident. The admin listener's address is the layout's (`NginxLayout.admin_host`)."""

    rest: int = 8080
    grpc: int = 8081
    admin: int = 8082
    public_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        for what in ("rest", "grpc", "admin"):
            _check_port(getattr(self, what), f"nginx {what} port")
        if len({self.rest, self.grpc, self.admin}) != 3:
            raise ValueError(f"nginx ports must differ, got {self.rest}, {self.grpc}, {self.admin}")
        try:
            ipaddress.ip_address(self.public_host)
        except ValueError:
            raise ValueError(f"nginx public host must be an IP address, got {self.public_host!r}") from None

    @property
    def public_listen(self) -> str:
        """`public_host` as nginx's `listen` takes it (an IPv6 address in brackets)."""
        return f"[{self.public_host}]" if ":" in self.public_host else self.public_host


@dataclass(frozen=True)
class SlotAddress:
    """Where one slot's model server listens."""

    name: str
    host: str
    rest_port: int  # BentoML's HTTP server: native API, /metrics, everything but /v2/
    grpc_port: int
    v2_port: int | None = None  # the Bento's own V2 REST listener (/v2/); rest_port when None

    def __post_init__(self) -> None:
        if not _SLOT_NAME.match(self.name):
            raise ValueError(f"slot name must be lower-case letters, digits, - or _, got {self.name!r}")
        if not self.host or _UNSAFE_PATH.search(self.host):
            raise ValueError(f"slot {self.name} needs a host, got {self.host!r}")
        _check_port(self.rest_port, f"slot {self.name} REST port")
        _check_port(self.grpc_port, f"slot {self.name} gRPC port")
        if self.v2_port is not None:
            _check_port(self.v2_port, f"slot {self.name} V2 REST port")

    def to_json(self) -> dict[str, Any]:
        ports = {"rest_port": self.rest_port, "grpc_port": self.grpc_port}
        if self.v2_port is not None:
            ports["v2_port"] = self.v2_port
        return {"host": self.host, **ports}


@dataclass(frozen=True)
class Routing:
    """Who gets traffic: `weight` is the candidate's percent share; `shadow` mirrors to it."""

    stable: str
    candidate: str | None = None
    weight: int = 0
    shadow: bool = False

    def __post_init__(self) -> None:
        for role, name in (("stable", self.stable), ("candidate", self.candidate or "none")):
            if not isinstance(name, str) or not _SLOT_NAME.match(name):
                raise ValueError(f"{role} must be a slot name, got {name!r}")
        if self.candidate == self.stable:
            raise ValueError(f"candidate must differ from stable, both are {self.stable!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, int) or not 0 <= self.weight <= 100:
            raise ValueError(f"weight must be an integer 0-100, got {self.weight!r}")
        if not isinstance(self.shadow, bool):
            raise ValueError(f"shadow must be True or False, got {self.shadow!r}")  # noqa: TRY004 - one error type
        if self.candidate is None and (self.weight > 0 or self.shadow):
            raise ValueError("a weight above 0 or shadow on needs a candidate")

    def to_json(self) -> dict[str, Any]:
        return {"stable": self.stable, "candidate": self.candidate, "weight": self.weight, "shadow": self.shadow}


@dataclass(frozen=True)
class NginxLayout:
    """Where the rendered config finds its parts, as the nginx that runs it sees them.

    The default is this machine's nginx (Debian's Lua module, admin on loopback). A
    container sees its mounts instead: see `deploy.compose_target.CONTAINER_LAYOUT`."""

    lua_dir: Path = NGINX_DIR / "lua"
    modules_dir: Path | None = MODULES_DIR  # None: Lua is built in (OpenResty)
    admin_host: str = "127.0.0.1"
    admin_allow: tuple[str, ...] = ("127.0.0.1",)  # sources allowed on the admin listener (the token still applies)

    def __post_init__(self) -> None:
        for value in (str(self.lua_dir), str(self.modules_dir or ""), self.admin_host, *self.admin_allow):
            if _UNSAFE_PATH.search(value) or any(c in value for c in " ;{}"):
                raise ValueError(f"nginx layout value {value!r} cannot go into an nginx config")


def _nginx_duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def render_config(
    prefix: Path, ports: NginxPorts, slots: Sequence[SlotAddress], routing_file: Path, token_file: Path,
    config_generation: int, shadow_timeout_s: float = 1.0, *, max_fails: int = 3, fail_timeout_s: int = 10,
    max_body: str = "8m", client_timeout_s: float = 10.0, layout: NginxLayout | None = None,
    force_token_file: Path | None = None, force_allow: Sequence[str] = (), upstream_timeout_s: float = 10.0,
) -> str:  # fmt: skip
    """The nginx config text for these listeners and slots (pure: reads only the template).

    Paths are as the nginx that runs the config sees them (`layout`: this machine by default).

    `slots` are the addresses nginx starts with (the first is the default stable slot);
    the routing file, when present, overrides them. `config_generation` is what
    `GET /canary/status` reports once workers run this config.

    Passive health: `max_fails` transport failures (connect error, reset, timeout) of a slot
    within `fail_timeout_s` take it out of unforced rotation for `fail_timeout_s`; a slot's
    own 503 never counts. `upstream_timeout_s` bounds how long nginx waits for a slot's
    answer before it counts as a timeout (and an unforced request moves to the other slot).
    `X-Canary` forcing is honoured only with the token in `force_token_file` (none: no
    token forces) or from the CIDRs in `force_allow`.

    Exposure: the public listeners bind `ports.public_host` and answer 404 for the admin API
    and for BentoML's own pages (its `/metrics`, the Swagger UI at `/` and `/docs.json`):
    Prometheus scrapes the slots and the admin listener's `/metrics` directly. The admin API
    accepts only the slot hosts named in `slots` (ports may move): a leaked admin token can
    shift weights but cannot send clients' traffic to a machine of its holder's choosing.
    """
    layout = layout or NginxLayout()
    prefix, routing_file, token_file = Path(prefix).resolve(), Path(routing_file).resolve(), Path(token_file).resolve()
    for path in (prefix, routing_file, token_file, NGINX_DIR):
        if _UNSAFE_PATH.search(str(path)):
            raise ValueError(f"path {str(path)!r} has a character nginx config cannot quote")
    if not slots or len({s.name for s in slots}) != len(slots):
        raise ValueError("render_config needs one or more slots with distinct names")
    if not 0 < shadow_timeout_s <= 60 or max_fails < 1 or fail_timeout_s < 1:
        raise ValueError("shadow_timeout_s must be in (0, 60], max_fails and fail_timeout_s at least 1")
    if not 0 < upstream_timeout_s <= 3600:
        raise ValueError("upstream_timeout_s must be in (0, 3600]")
    for source in force_allow:
        if not _CIDR.match(source):
            raise ValueError(f"force_allow entry {source!r} must be an IPv4/IPv6 address or CIDR")
    init = {
        "config_generation": int(config_generation), "max_fails": max_fails, "fail_timeout": fail_timeout_s,
        "routing_file": str(routing_file), "token_file": str(token_file), "default_stable": slots[0].name,
        "slots": {s.name: s.to_json() for s in slots}, "slot_hosts": sorted({s.host for s in slots}),
    }  # fmt: skip
    if force_token_file is not None:
        force_path = str(Path(force_token_file).resolve())
        if _UNSAFE_PATH.search(force_path):
            raise ValueError(f"path {force_path!r} has a character nginx config cannot quote")
        init["force_token_file"] = force_path
    # An nginx config, not HTML: escaping would corrupt it; every value is ours, validated above.
    env = jinja2.Environment(  # noqa: S701  # nosec B701
        loader=jinja2.FileSystemLoader(NGINX_DIR), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    return env.get_template("nginx.conf.j2").render(
        prefix=prefix, ports=ports, public_host=ports.public_listen, routing_file=routing_file, token_file=token_file,
        config_generation=int(config_generation), modules_dir=layout.modules_dir, lua_dir=layout.lua_dir,
        admin_host=layout.admin_host, admin_allow=layout.admin_allow,
        init_json=json.dumps(init, sort_keys=True), shadow_timeout=_nginx_duration(shadow_timeout_s),
        max_body=max_body, client_timeout=_nginx_duration(client_timeout_s),
        upstream_timeout=_nginx_duration(upstream_timeout_s), force_allow=tuple(force_allow),
    )  # fmt: skip


def write_routing_file(path: Path, routing: Routing, slots: Sequence[SlotAddress]) -> None:
    """Write the routing nginx loads at every start and reload, atomically (tmp + rename)."""
    names = {s.name for s in slots}
    unknown = {routing.stable, routing.candidate} - names - {None}
    if unknown:
        raise ValueError(f"routing names unknown slot(s) {', '.join(sorted(unknown))}")  # type: ignore[arg-type]
    doc = {**routing.to_json(), "slots": {s.name: s.to_json() for s in slots}}
    write_atomic(Path(path), json.dumps(doc, indent=2, sort_keys=True) + "\n")


def ensure_token(path: Path) -> str:
    """The admin token in `path`, created (random, mode 0600) if the file is missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token = path.read_text().strip()
        if not token:
            raise NginxError(f"admin token file {path} is empty") from None
        return token
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def _one_line(output: str) -> str:
    """nginx's most telling line, without its timestamp and pid prefix."""
    lines = [line.strip() for line in output.splitlines() if line.strip()] or ["no output"]
    # the fatal line first: an [error] logged meanwhile by a request must not hide it
    ranked = [next((x for x in lines if re.search(pattern, x)), None) for pattern in _SEVERITY]
    chosen = next((x for x in ranked if x), lines[-1])
    return re.sub(r"^(nginx: )?(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d )?(\[\w+\]) (\d+#\d+: )?", r"\3 ", chosen)


def _header(config_text: str, key: str) -> str | None:
    found = re.search(rf"^# {re.escape(key)}: (.+)$", config_text, re.MULTILINE)
    return found.group(1).strip() if found else None


class NginxController:
    """One nginx master under `prefix` (config, pid, logs, temp files): apply, start, stop, ask.

    The admin port is read from the live config's header unless `admin_port` is given (the
    config says where nginx listens). Callers serialise changes with their own lock.
    """

    def __init__(self, prefix: Path, binary: str = "nginx", *, admin_port: int | None = None, timeout_s: float = 10.0):
        self.prefix = Path(prefix).resolve()
        self.binary = shutil.which(binary) or (f"/usr/sbin/{binary}" if "/" not in binary else binary)
        self.conf, self.last_good = self.prefix / "nginx.conf", self.prefix / "nginx.conf.last-good"
        self.pid_file, self.error_log = self.prefix / "nginx.pid", self.prefix / "logs" / "error.log"
        self._admin_port, self.timeout_s = admin_port, timeout_s

    @property
    def admin_port(self) -> int:
        port = self._admin_port or (_header(self.conf.read_text(), "canary-admin-port") if self.conf.exists() else None)
        if port is None:
            raise NginxError(f"no nginx config with an admin port in {self.prefix}")
        return int(port)

    def apply(self, config_text: str, generation: int) -> None:
        """Test, install and start-or-reload `config_text`, then wait until nginx reports
        `generation`. A config that `nginx -t` refuses, or that nginx does not confirm (a
        reload that failed still exits 0), raises `NginxConfigError` and leaves the running
        config and `nginx.conf` as they were. The replaced config stays as `nginx.conf.last-good`."""
        token_file = _header(config_text, "canary-token-file") or "(none)"
        token = Path(token_file).read_text().strip() if os.access(token_file, os.R_OK) else ""
        if not token:  # nginx -t skips init_by_lua, which would refuse this only at reload
            raise NginxConfigError(f"nginx config refused: admin token file {token_file} unreadable or empty")
        for sub in ("logs", "tmp"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix="nginx.conf.", suffix=".new", dir=self.prefix)
        with os.fdopen(fd, "w") as handle:
            handle.write(config_text)
        test = subprocess.run([self.binary, "-t", "-q", "-p", f"{self.prefix}/", "-c", tmp_name],
                              check=False, capture_output=True, text=True, timeout=30)  # fmt: skip
        if test.returncode != 0:
            os.unlink(tmp_name)
            raise NginxConfigError(f"nginx config refused: {_one_line(test.stderr + test.stdout)}")
        previous = self.conf.read_text() if self.conf.exists() else None
        if previous is not None:
            write_atomic(self.last_good, previous)
        os.replace(tmp_name, self.conf)
        log_offset = self.error_log.stat().st_size if self.error_log.exists() else 0
        try:
            if (pid := self._pid()) is not None:
                os.kill(pid, signal.SIGHUP)
            else:
                self._launch()
            self._confirm(generation, token, log_offset)
        except NginxError:
            if previous is None:
                self.conf.unlink(missing_ok=True)
            else:
                write_atomic(self.conf, previous)  # the file on disk stays what actually runs
            raise

    def start(self) -> None:
        """Start nginx on the installed config (after a reboot or `stop`); no-op if running."""
        if not self.running():
            self._launch()

    def stop(self) -> None:
        """Stop our nginx master (the pid in our own pid file): graceful QUIT, then TERM, KILL."""
        pid = self._pid()
        for sig, wait_s in ((signal.SIGQUIT, self.timeout_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if pid is None or not _alive(pid):
                return
            os.kill(pid, sig)
            if _wait(lambda: not _alive(pid), wait_s):  # type: ignore[arg-type]
                return
        raise NginxError(f"nginx master {pid} did not exit")

    def master_pid(self) -> int:
        """The running master's pid (from our pid file); NginxError when none runs."""
        pid = self._pid()
        if pid is None:
            raise NginxError(f"no nginx master runs for {self.prefix}")
        return pid

    def running(self) -> bool:
        """True while the master named by our pid file lives and serves this prefix."""
        return self._pid() is not None

    def status(self, token: str) -> dict[str, Any]:
        """`GET /canary/status`: routing, generations, per-slot health and counters."""
        return self._admin("GET", "/canary/status", token)

    def set_routing(self, routing: Routing, token: str, slots: Sequence[SlotAddress] = ()) -> dict[str, Any]:
        """`PUT /canary/routing` (optionally moving `slots`): in effect for the next request,
        no reload. Returns the status nginx reports back. Call `write_routing_file` first so
        that a restart of nginx keeps the change."""
        body = {**routing.to_json(), "slots": {s.name: s.to_json() for s in slots}}
        return self._admin("PUT", "/canary/routing", token, body)

    def _admin(self, method: str, path: str, token: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        try:  # trust_env=False: a proxy from the environment must never see the token
            with httpx.Client(trust_env=False, timeout=5.0) as client:
                answer = client.request(method, url, headers={"X-Canary-Token": token}, json=body)
        except httpx.HTTPError as exc:
            raise NginxError(f"nginx admin API {url} unreachable: {exc}") from exc
        if answer.status_code != 200:
            reason = answer.json().get("error") if "json" in answer.headers.get("content-type", "") else answer.text
            raise NginxError(f"nginx admin API refused {method} {path}: {answer.status_code} {reason}")
        return answer.json()

    def _launch(self) -> None:
        # nginx daemonises: the parent exits once the listeners are bound, so a port already
        # taken shows in its exit code. Output goes to a file: the daemon keeps the handles.
        with tempfile.TemporaryFile("w+") as out:
            started = subprocess.run([self.binary, "-p", f"{self.prefix}/", "-c", str(self.conf)],
                                     check=False, stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=30)  # fmt: skip
            out.seek(0)
            if started.returncode != 0:
                raise NginxConfigError(f"nginx did not start: {_one_line(out.read())}")
        if not _wait(self.running, self.timeout_s):
            raise NginxError(f"nginx started but wrote no pid to {self.pid_file}")

    def _confirm(self, generation: int, token: str, log_offset: int) -> None:
        seen: object = None
        log = ""

        def settled() -> bool:
            nonlocal seen, log
            try:
                seen = serving(self.status(token))
            except NginxError as exc:
                seen = exc
            with contextlib.suppress(OSError), self.error_log.open(errors="replace") as handle:
                handle.seek(log_offset)  # what nginx said since the signal
                log = handle.read()
            return seen == [generation] or bool(_REJECTED.search(log))

        if not _wait(settled, self.timeout_s) or seen != [generation]:
            raise NginxConfigError(f"nginx did not confirm config generation {generation} "
                                   f"(its workers serve {seen}): {_one_line(log)}")  # fmt: skip

    def _pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            return None  # `nginx -t` leaves an empty pid file behind: not running
        # only our own master: a recycled pid or another nginx never gets our signals
        if not _alive(pid) or "nginx: master process" not in cmdline or str(self.conf) not in cmdline:
            return None
        return pid


def serving(status: dict[str, Any]) -> list[int]:
    """The config generations nginx's workers serve new connections with, from `/canary/status`.

    Right after a reload the old workers may still accept for a moment: a reload is complete
    when this is the new generation alone, not when the one worker that answered runs it."""
    found = status.get("serving_generations")
    return sorted(found) if isinstance(found, list) else []


# a reload nginx gave up on (old workers keep the old config). Not "bind() to ... failed":
# nginx retries a bind for 2.5 s and may still succeed; "still could not bind()" is final.
_REJECTED = re.compile(r"^.*(\[emerg\](?!.*bind\(\) to )|init_by_lua error)", re.MULTILINE)


def _wait(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # polling interval, bounded by the deadline
    return True


def _alive(pid: int) -> bool:
    """False once `pid` is gone or a zombie (a daemonised master's new parent may not reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
