#!/usr/bin/env python3
"""A stand-in for the Docker engine, as `docker`, for what a real engine cannot show quickly:
the exact compose calls of each command, a smoke inference that fails on demand, an engine
that is not there. tests/deploy/test_compose_engine.py runs the same flow on the real one.

It understands the `docker compose -p P -f F <command>` calls `deploy.compose_target` makes,
records each one (argv and the slot tags) as a JSON line in $FAKE_DOCKER_LOG, and keeps the
services' states in $FAKE_DOCKER_STATE; `docker inspect` answers those states the way the
engine does, `docker image inspect` finds the serving images only. The slot containers are
pretend (a smoke `exec` answers the model version of the slot's image tag); nginx is REAL:
`up ... nginx` runs this machine's nginx on the config the CLI rendered for the container,
with the paths, ports and modules mapped the way the compose file's bind mounts and
published ports map them.

Env: FAKE_DOCKER_LOG, FAKE_DOCKER_STATE (files), FAKE_DOCKER_RENDERED (the rendered dir),
FAKE_DOCKER_PREFIX (nginx prefix for the real nginx), FAKE_DOCKER_FAIL_SMOKE (a slot name
whose smoke inference fails), FAKE_DOCKER_NO_DAEMON=1 (answer like a client with no engine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SLOTS = ("blue", "green")
MODULES = "load_module /usr/lib/nginx/modules/ndk_http_module.so;\nload_module /usr/lib/nginx/modules/ngx_http_lua_module.so;\n"


def _state() -> dict:
    path = Path(os.environ["FAKE_DOCKER_STATE"])
    return json.loads(path.read_text()) if path.exists() else {"services": {}, "nginx_pid": None}


def _save(state: dict) -> None:
    Path(os.environ["FAKE_DOCKER_STATE"]).write_text(json.dumps(state))


def _mapped_config() -> Path:
    """The rendered container config as this machine's nginx runs it: bind mounts become
    host paths, published ports become listeners on the host address compose.yaml publishes
    them on (the public ones on $CANARY_PUBLIC_HOST, the admin one on loopback), OpenResty's
    built-in Lua becomes Debian's modules."""
    rendered = Path(os.environ["FAKE_DOCKER_RENDERED"])
    prefix = Path(os.environ["FAKE_DOCKER_PREFIX"])
    text = (rendered / "nginx.conf").read_text()
    text = text.replace("/etc/bento-canary/rendered", str(rendered))
    text = text.replace("/etc/bento-canary/nginx", str(REPO / "nginx"))
    text = text.replace("/run/bento-canary", str(prefix))
    public = os.environ.get("CANARY_PUBLIC_HOST", "127.0.0.1")
    ports = {"8080": (public, os.environ.get("CANARY_REST_PORT", "8080")),
             "8081": (public, os.environ.get("CANARY_GRPC_PORT", "8081")),
             "8079": ("127.0.0.1", os.environ.get("CANARY_ADMIN_PORT", "8079"))}  # fmt: skip
    for inside, (host, outside) in ports.items():
        text = text.replace(f"listen 0.0.0.0:{inside}", f"listen {host}:{outside}")
    text = text.replace("# Lua is built in (OpenResty): no modules to load.\n", MODULES)
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    path = prefix / "nginx.mapped.conf"
    path.write_text(text)
    return path


def _start_nginx(state: dict) -> None:
    prefix = Path(os.environ["FAKE_DOCKER_PREFIX"])
    config = _mapped_config()
    pid = state.get("nginx_pid")
    if pid and _alive(pid):
        return
    run = subprocess.run(["nginx", "-p", f"{prefix}/", "-c", str(config)], capture_output=True, text=True)
    if run.returncode != 0:
        print(f"Error response from daemon: nginx failed: {run.stderr.strip()}", file=sys.stderr)
        sys.exit(1)
    pid_file = prefix / "nginx.pid"
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        time.sleep(0.05)
    state["nginx_pid"] = int(pid_file.read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _tag(slot: str) -> str:
    return os.environ.get(f"{slot.upper()}_TAG", "")


def _inspect(ids: list[str]) -> int:
    """`docker inspect <id>...`: the fields `ComposeCli.states` reads, for the pretend containers."""
    services = _state()["services"]
    items = []
    for container in ids:
        name = container.removeprefix("fake-")
        info = services.get(name, {})
        running = info.get("state") == "running"
        items.append({"Id": container, "Name": f"/bento-canary-{name}-1", "RestartCount": 0,
                      "State": {"Status": info.get("state"), "ExitCode": 0,
                                **({"Health": {"Status": "healthy"}} if running else {})},
                      "Config": {"Labels": {"com.docker.compose.service": name}}})  # fmt: skip
    print(json.dumps(items))
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["inspect"]:
        return _inspect(argv[1:])
    if argv[:2] == ["image", "inspect"]:  # the serving images are there, nothing else is
        if argv[-1].startswith("digits-service:"):
            print("[{}]")
            return 0
        print(f"Error: No such image: {argv[-1]}", file=sys.stderr)
        return 1
    with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
        log.write(json.dumps({"argv": argv, "tags": {s: _tag(s) for s in SLOTS}}) + "\n")
    if os.environ.get("FAKE_DOCKER_NO_DAEMON"):
        print("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?",
              file=sys.stderr)  # fmt: skip
        return 1
    assert argv[0] == "compose" and argv[1] == "-p" and argv[3] == "-f", argv
    command, args = argv[5], argv[6:]
    state = _state()
    services = state["services"]
    if command == "up":
        names = [a for a in args if not a.startswith("-") and not a.isdigit()]
        for name in names:
            services[name] = {"image": f"digits-service:{_tag(name)}" if name in SLOTS else name, "state": "running"}
            if name == "nginx":
                _start_nginx(state)
    elif command == "stop":
        for name in args:
            services.setdefault(name, {})["state"] = "exited"
    elif command == "kill":  # kill -s HUP nginx: reload on the re-rendered config
        _mapped_config()
        if state.get("nginx_pid"):
            os.kill(state["nginx_pid"], signal.SIGHUP)
    elif command == "exec":  # exec -T <slot> python -c SCRIPT rows port
        slot = args[1]
        if services.get(slot, {}).get("state") != "running":
            print(f"service {slot!r} is not running", file=sys.stderr)
            return 1
        if os.environ.get("FAKE_DOCKER_FAIL_SMOKE") == slot:
            print("urllib.error.HTTPError: HTTP Error 500: Internal Server Error", file=sys.stderr)
            return 1
        version = services[slot]["image"].rsplit(":v", 1)[-1]
        print(json.dumps({"model_name": "digits", "model_version": version, "outputs": []}))
    elif command == "ps":  # ps -a -q: one container id per service
        for name in services:
            print(f"fake-{name}")
    elif command == "down":
        pid = state.get("nginx_pid")
        if pid and _alive(pid):
            os.kill(pid, signal.SIGQUIT)
            for _ in range(100):
                if not _alive(pid):
                    break
                time.sleep(0.05)
        state = {"services": {}, "nginx_pid": None}
    else:
        print(f"fake docker: unsupported command {command}", file=sys.stderr)
        return 1
    _save(state)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
