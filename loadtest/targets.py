"""`Target`: where the gate sends one slot's traffic, who must answer it, and its
command-line form.

A target is a REST base URL, an optional V2 gRPC address and extra headers. Point both
targets at nginx with forcing headers (`X-Canary: never` for stable, `X-Canary: always` for
the candidate; sent as `x-canary` metadata on gRPC) or straight at the two slots.

Forcing alone does not prove who answered: a router that fails a forced request over to the
other slot would have the gate measure stable twice. So a target can name the router slot
(`slot`, checked against the `X-Canary-Slot` answer header, `x-canary-slot` initial metadata
on gRPC) and the model version (`model_version`, checked against the V2 answer) that must
answer; any other answer is a failed request of that target.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import urlparse

ROLES = ("stable", "candidate")  # the gate's two targets (deploy.state.SLOTS names the router's slots)
SLOT_HEADER = "X-Canary-Slot"  # set by the router on every answer (gRPC: initial metadata)
FORCE_TOKEN_HEADER = "X-Canary-Force-Token"  # noqa: S105  # nosec B105 - a header name, not a secret
# The force token travels to the Locust process in this variable, never on its command line.
FORCE_TOKEN_ENV = "CANARY_GATE_FORCE_TOKEN"  # noqa: S105  # nosec B105 - a variable name, not a secret
# Header values never written into result.json or the report (`describe`).
_SECRET_HEADERS = ("token", "authorization", "cookie", "secret")


@dataclass(frozen=True)
class Target:
    """One slot as the gate reaches it.

    rest: base URL of the V2 REST API, e.g. `http://127.0.0.1:8080` (no trailing path).
    grpc: `host:port` of the V2 gRPC API, or None when the slot is only reached over REST.
    headers: sent with every request (HTTP headers; lower-cased gRPC metadata).
    slot: the router slot (e.g. "blue") that must answer, per the `X-Canary-Slot` header;
        None = not checked. When set, an answer without the header is a mismatch.
    model_version: the model version that must answer (the V2 answer's `model_version`);
        None = not checked.
    """

    rest: str
    grpc: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    slot: str | None = None
    model_version: str | None = None

    def __post_init__(self) -> None:
        parsed = urlparse(self.rest)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"REST target {self.rest!r} must be an http(s):// base URL")
        object.__setattr__(self, "rest", self.rest.rstrip("/"))
        if self.grpc is not None and (not self.grpc or ":" not in self.grpc or "/" in self.grpc):
            raise ValueError(f"gRPC target {self.grpc!r} must be host:port")
        object.__setattr__(self, "headers", MappingProxyType(dict(self.headers)))
        for name in ("slot", "model_version"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, str(value).strip() or None)

    def wrong_answerer(self, slot: str | None, model_version: str | None) -> str | None:
        """Why an answer from router slot `slot` (None: no `X-Canary-Slot`) with model version
        `model_version` is not this target's, or None when it is (or nothing is checked)."""
        slot_ok = self.slot is None or slot == self.slot
        version_ok = self.model_version is None or model_version == self.model_version
        if slot_ok and version_ok:
            return None
        answered = f"slot {slot}" if slot else f"a server without {SLOT_HEADER}"
        sent = self.slot or "any slot"
        version = f" (version {self.model_version})" if self.model_version else ""
        return f"answered by {answered} (version {model_version or '?'}), sent to {sent}{version}"

    def to_args(self, slot: str) -> list[str]:
        """The gate locustfile's options for this target as slot `slot`."""
        args = [f"--{slot}-rest", self.rest]
        if self.grpc:
            args += [f"--{slot}-grpc", self.grpc]
        for key, value in self.headers.items():
            args += [f"--{slot}-header", f"{key}: {value}"]
        if self.slot:
            args += [f"--{slot}-slot", self.slot]
        if self.model_version:
            args += [f"--{slot}-version", self.model_version]
        return args

    def describe(self) -> dict[str, object]:
        headers = {k: "***" if any(s in k.lower() for s in _SECRET_HEADERS) else v for k, v in self.headers.items()}
        return {
            "rest": self.rest, "grpc": self.grpc, "headers": headers,
            "slot": self.slot, "model_version": self.model_version,
        }  # fmt: skip


def request_name(protocol: str, slot: str | None, model_version: str | None) -> str:
    """How the load-test locustfile names a request in Locust's tables, CSV and charts: the
    protocol, then the router slot and model version that answered ("rest-json blue v3");
    "?" for what the answer did not say (no `X-Canary-Slot`: nginx itself did not answer)."""
    return f"{protocol} {slot or '?'} v{model_version or '?'}"


def answering_slot(name: str) -> str:
    """The slot in a `request_name` ("?" when the answer named none)."""
    words = name.split()
    return words[1] if len(words) == 3 else "?"


def parse_header(text: str) -> tuple[str, str]:
    """`"X-Canary: always"` -> ("X-Canary", "always")."""
    key, sep, value = text.partition(":")
    if not sep or not key.strip():
        raise ValueError(f"header {text!r} must look like 'Name: value'")
    return key.strip(), value.strip()


def from_args(
    rest: str | None,
    grpc: str | None,
    headers: list[str] | None,
    slot: str | None = None,
    model_version: str | None = None,
) -> Target:
    if not rest:
        raise ValueError("a REST base URL is required for each target")
    headers_dict = dict(parse_header(h) for h in headers or ())
    return Target(rest, grpc or None, headers_dict, slot or None, model_version or None)
