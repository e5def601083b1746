"""`Target`: where the gate sends one slot's traffic, and its command-line form.

A target is a REST base URL, an optional V2 gRPC address and extra headers. Point both
targets at nginx with forcing headers (`X-Canary: never` for stable, `X-Canary: always` for
the candidate; sent as `x-canary` metadata on gRPC) or straight at the two slots.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import urlparse

SLOTS = ("stable", "candidate")


@dataclass(frozen=True)
class Target:
    """One slot as the gate reaches it.

    rest: base URL of the V2 REST API, e.g. `http://127.0.0.1:8080` (no trailing path).
    grpc: `host:port` of the V2 gRPC API, or None when the slot is only reached over REST.
    headers: sent with every request (HTTP headers; lower-cased gRPC metadata).
    """

    rest: str
    grpc: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parsed = urlparse(self.rest)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"REST target {self.rest!r} must be an http(s):// base URL")
        object.__setattr__(self, "rest", self.rest.rstrip("/"))
        if self.grpc is not None and (not self.grpc or ":" not in self.grpc or "/" in self.grpc):
            raise ValueError(f"gRPC target {self.grpc!r} must be host:port")
        object.__setattr__(self, "headers", MappingProxyType(dict(self.headers)))

    @property
    def grpc_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple((k.lower(), v) for k, v in self.headers.items())

    def to_args(self, slot: str) -> list[str]:
        """The gate locustfile's options for this target as slot `slot`."""
        args = [f"--{slot}-rest", self.rest]
        if self.grpc:
            args += [f"--{slot}-grpc", self.grpc]
        for key, value in self.headers.items():
            args += [f"--{slot}-header", f"{key}: {value}"]
        return args

    def describe(self) -> dict[str, object]:
        return {"rest": self.rest, "grpc": self.grpc, "headers": dict(self.headers)}


def parse_header(text: str) -> tuple[str, str]:
    """`"X-Canary: always"` -> ("X-Canary", "always")."""
    key, sep, value = text.partition(":")
    if not sep or not key.strip():
        raise ValueError(f"header {text!r} must look like 'Name: value'")
    return key.strip(), value.strip()


def from_args(rest: str | None, grpc: str | None, headers: list[str] | None) -> Target:
    if not rest:
        raise ValueError("a REST base URL is required for each target")
    return Target(rest, grpc or None, dict(parse_header(h) for h in headers or ()))
