"""The load-test locustfile's own options, checked before any traffic; no Locust here.

`check_options` refuses bad ones with `LoadSetupError` (the locustfile logs it in one line
and exits 1); `build_target` turns them and Locust's --host into the `Target` every user
loads (forcing header, force token, the slot and model version that must answer).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

from loadtest.targets import FORCE_TOKEN_ENV, FORCE_TOKEN_HEADER, Target

PROTOCOLS = ("rest-json", "rest-binary", "grpc", "native")
DEFAULT_WEIGHTS = ",".join(f"{protocol}=1" for protocol in PROTOCOLS)
DEFAULT_USER_RATE = 200.0  # at most 200 requests/s per user: a closed loop, paced only loosely
DEFAULT_GRPC_PORT = "8081"  # the local stack's nginx gRPC port (StackSettings.nginx_grpc_port)
GRPC_PORT_ENV = "CANARY_STACK_NGINX_GRPC_PORT"  # the same setting `canary up` reads


class LoadSetupError(Exception):
    """Bad options: one line and exit code 1, before any traffic."""


def parse_weights(text: str) -> dict[str, int]:
    """'rest-json=2,grpc=1' -> every protocol's weight (those not named: 0)."""
    weights = dict.fromkeys(PROTOCOLS, 0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in weights:
            raise LoadSetupError(f"unknown protocol {name!r} in --weights; choose from {', '.join(PROTOCOLS)}")
        if weight.strip() and not weight.strip().isdigit():
            raise LoadSetupError(f"weight of {name} must be a whole number, got {weight.strip()!r}")
        weights[name] = int(weight.strip() or 1)
    if not any(weights.values()):
        raise LoadSetupError("--weights selects no protocol")
    return weights


def grpc_address(options: Any, host: str | None) -> str:
    """--grpc-host, else the REST host's name with the local stack's nginx gRPC port."""
    if options.grpc_host:
        return options.grpc_host
    hostname = urlparse(host or "").hostname or "127.0.0.1"
    hostname = f"[{hostname}]" if ":" in hostname else hostname
    return f"{hostname}:{os.environ.get(GRPC_PORT_ENV) or DEFAULT_GRPC_PORT}"


def build_target(options: Any, host: str | None) -> Target:
    """The target every user loads, from the options and Locust's --host."""
    if not host:
        raise LoadSetupError("no --host: give the REST base URL, e.g. --host http://127.0.0.1:8080")
    headers: dict[str, str] = {}
    if options.force:
        headers["X-Canary"] = options.force
        if token := os.environ.get(FORCE_TOKEN_ENV, "").strip():
            headers[FORCE_TOKEN_HEADER] = token
    try:
        return Target(
            host, grpc_address(options, host), headers, options.expect_slot or None, options.expect_version or None
        )
    except ValueError as exc:
        raise LoadSetupError(str(exc)) from None


def check_options(options: Any, host: str | None) -> dict[str, int]:
    weights = parse_weights(options.weights)
    if options.user_rate < 0:
        raise LoadSetupError("--user-rate must be >= 0")
    if not options.request_timeout > 0:
        raise LoadSetupError("--request-timeout must be > 0")
    if host:  # the web UI may still ask for it
        build_target(options, host)
    return weights
