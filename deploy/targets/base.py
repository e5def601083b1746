"""The one release interface every target implements, and its refusal.

Each method is one `canary` command: it does the whole job (plan, checks, routing, state,
audit) and returns what the command prints. Errors are `CanaryError` (one line, exit 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from models.errors import CanaryError

Say = Callable[[str], None]


@dataclass(frozen=True)
class Applied:
    """What a routing command did (or, with --dry-run, would do): lines to print and an exit code."""

    lines: list[str] = field(default_factory=list)
    exit_code: int = 0


@dataclass(frozen=True)
class GateRequest:
    duration_s: float
    users: int
    spawn_rate: float
    thresholds: Path | None = None  # None: loadtest/thresholds.yaml
    source: str = "locust"  # rollout: what judges each step (locust, or live: the step's real traffic)


class Unsupported(CanaryError):
    """This command does not exist on this target (yet): refused in one line."""

    def __init__(self, target: str, command: str, why: str) -> None:
        super().__init__(f"`canary {command}` is not available on --target {target}: {why}")


class ReleaseTarget(Protocol):
    """A place releases run: the local processes, a compose project, a Kubernetes cluster."""

    name: str

    def up(self, say: Say) -> list[str]: ...
    def down(self) -> list[str]: ...
    def deploy(self, release: str, dry_run: bool) -> Applied: ...
    def weight(self, percent: int, dry_run: bool) -> Applied: ...
    def switch(self, dry_run: bool) -> Applied: ...
    def promote(self, dry_run: bool, bake: str | None, say: Say) -> Applied: ...
    def rollback(self, reason: str, dry_run: bool) -> Applied: ...
    def shadow(self, on: bool, dry_run: bool) -> Applied: ...
    def status(self) -> dict[str, Any]: ...
    def format_status(self, status: dict[str, Any]) -> str: ...
    def history(self) -> list[dict[str, Any]]: ...
    def gate(self, request: GateRequest, say: Say) -> Applied: ...
    def rollout(self, steps: list[int], request: GateRequest, bake: str | None, say: Say) -> Applied: ...


def parse_duration(text: str, allow_zero: bool = False) -> float:
    """ "30s", "2m" or "45" -> seconds (1 s to 60 m; "0" too when `allow_zero`)."""
    if allow_zero and text.strip() in ("0", "0s", "0m"):
        return 0.0
    units = {"s": 1, "m": 60}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise CanaryError(f"duration {text!r} must look like 30s or 2m") from None
    if not 0 < seconds <= 3600:
        raise CanaryError(f"duration {text!r} must be between 1s and 60m")
    return seconds
