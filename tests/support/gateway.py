"""A Gateway API data plane for the Kubernetes tests: real nginx, configured from the routes.

No Gateway implementation (Envoy Gateway, Istio...) runs on these machines. This stand-in
does what one does with the `digits` HTTPRoute and GRPCRoute the stand-in API server holds:
exact `x-canary` header matches go to their rule's Service, everyone else is split by the
weighted rule's weights, and Service names resolve to local addresses (`services`). It is
rendered once, from the routes as they are when it starts (a real gateway would follow
later patches; the gate only uses the header rules).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any, Self

import httpx

from deploy.k8s_plan import CANARY_HEADER
from deploy.process import free_port
from tests.support.tools import require_tool


def _rules(route: dict[str, Any]) -> tuple[dict[str, str], list[tuple[str, int]]]:
    """(x-canary value -> Service, [(Service, weight)] of the weighted rule)."""
    forced, weighted = {}, []
    for rule in route["spec"]["rules"]:
        values = [h["value"] for m in rule.get("matches") or () for h in m.get("headers") or ()
                  if h["name"].lower() == CANARY_HEADER]  # fmt: skip
        refs = rule.get("backendRefs") or []
        if values:
            forced[values[0]] = refs[0]["name"]
        else:
            weighted = [(ref["name"], int(ref.get("weight", 1))) for ref in refs]
    return forced, weighted


def _split(variable: str, weighted: list[tuple[str, int]], suffix: str) -> str:
    total = sum(weight for _, weight in weighted) or 1
    live = [(name, weight) for name, weight in weighted if weight > 0] or weighted[:1]
    lines = [f'    split_clients "${{request_id}}" ${variable} {{']
    for name, weight in live[:-1]:
        lines.append(f"        {100 * weight / total:.2f}% {name}-{suffix};")
    lines.append(f"        * {live[-1][0]}-{suffix};")
    return "\n".join([*lines, "    }"])


def _map(variable: str, forced: dict[str, str], default: str, suffix: str) -> str:
    lines = [f"    map $http_x_canary ${variable} {{", f"        default ${default};"]
    lines += [f"        {value} {service}-{suffix};" for value, service in sorted(forced.items())]
    return "\n".join([*lines, "    }"])


def render(folder: Path, http: dict, grpc: dict, services: dict[str, tuple[str, str]], ports: tuple[int, int]) -> str:
    """nginx.conf for the routes; `services` maps a Service name to (REST, gRPC) host:port."""
    upstreams = []
    for name, (rest, grpc_address) in sorted(services.items()):
        upstreams.append(f"    upstream {name}-rest {{ server {rest}; }}")
        upstreams.append(f"    upstream {name}-grpc {{ server {grpc_address}; }}")
    http_forced, http_weighted = _rules(http)
    grpc_forced, grpc_weighted = _rules(grpc)
    temp = "\n".join(f'    {kind}_temp_path "{folder}/tmp-{kind}";' for kind in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))  # fmt: skip
    return f"""worker_processes 1;
pid "{folder}/nginx.pid";
error_log "{folder}/error.log" warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temp}
{chr(10).join(upstreams)}
{_split("rest_weighted", http_weighted, "rest")}
{_map("rest_backend", http_forced, "rest_weighted", "rest")}
{_split("grpc_weighted", grpc_weighted, "grpc")}
{_map("grpc_backend", grpc_forced, "grpc_weighted", "grpc")}
    server {{
        listen 127.0.0.1:{ports[0]};
        location / {{ proxy_pass http://$rest_backend; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}
    server {{
        listen 127.0.0.1:{ports[1]} http2;
        location / {{ grpc_pass grpc://$grpc_backend; }}
    }}
}}
"""


class GatewayStandIn:
    """Real nginx in the foreground on free ports; `rest` and `grpc` are its listeners."""

    def __init__(self, folder: Path, http: dict, grpc: dict, services: dict[str, tuple[str, str]]) -> None:
        self.nginx = require_tool("nginx", installs="nginx-light")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ports = (free_port(), free_port())
        (folder / "nginx.conf").write_text(render(folder, http, grpc, services, self.ports))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.ports[0]}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.ports[1]}"

    def __enter__(self) -> Self:
        argv = [self.nginx, "-p", f"{self.folder}/", "-c", str(self.folder / "nginx.conf"), "-g", "daemon off;"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gateway nginx exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}"
                )
            try:
                httpx.get(f"{self.rest}/v2/health/ready", timeout=1)
                return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("gateway nginx did not start listening")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
